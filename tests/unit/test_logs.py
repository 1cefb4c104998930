"""Log output: JSON lines on stdout, journal fields when stdout is journald's."""

from __future__ import annotations

import io
import json
import os
import tempfile

import pytest
import structlog

from smtpguard import logs


def test_journal_fields_carry_every_field_and_the_json_line() -> None:
    event = {"vm": "web1", "until": 3.5, "top": {"a": 1}, "event": "vm.blocked",
             "level": "warning", "timestamp": "2026-12-01T00:00:00Z", "odd-key.x": None}
    fields = logs.journal_fields(event)
    assert json.loads(fields[0].removeprefix("MESSAGE=")) == event
    assert set(fields[1:]) == {
        "PRIORITY=4", "SYSLOG_IDENTIFIER=smtpguard", "SMTPGUARD_VM=web1",
        "SMTPGUARD_UNTIL=3.5", 'SMTPGUARD_TOP={"a": 1}', "SMTPGUARD_EVENT=vm.blocked",
        "SMTPGUARD_ODD_KEY_X=null"}


def test_journal_only_when_stdout_is_the_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryFile("w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert logs.journal_sender(f) is None  # not under systemd
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert logs.journal_sender(f) is None  # stdout redirected elsewhere
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            import systemd.journal  # noqa: F401
        except ImportError:
            assert logs.journal_sender(f) is None  # no python3-systemd: stdout
        else:
            assert logs.journal_sender(f) is not None
    assert logs.journal_sender(io.StringIO()) is None  # no descriptor


def test_renderer_sends_and_writes_nothing_or_falls_back_to_the_line() -> None:
    sent: list[tuple[str, ...]] = []
    out = io.StringIO()
    saved = structlog.get_config()  # global: put back whether or not the test passes
    try:
        for sendv in (lambda *f: sent.append(f), _refuse):
            structlog.configure(processors=[structlog.processors.add_log_level,
                                            logs.JournalRenderer(sendv)],
                                logger_factory=structlog.WriteLoggerFactory(file=out))
            structlog.get_logger().info("vm.blocked", vm="web1")
    finally:
        structlog.configure(**saved)
    assert len(sent) == 1 and "SMTPGUARD_VM=web1" in sent[0]
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"vm": "web1", "event": "vm.blocked", "level": "info"}]  # only the refused one


def _refuse(*fields: str) -> None:
    raise OSError("journal socket gone")
