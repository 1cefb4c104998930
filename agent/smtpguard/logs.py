"""structlog set up for JSON lines on stdout, or, when stdout is journald's
(under systemd), for journal entries that carry each field on its own."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from typing import Any, TextIO

import structlog

# Journal priorities (syslog levels) for structlog's method names.
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
            "critical": 2}
FIELD_PREFIX = "SMTPGUARD_"
_NOT_FIELD = re.compile(r"[^A-Z0-9_]")


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """One JSON object per line: event, level, timestamp (UTC), fields.
    Written to the journal instead when `stream` is the journal's stream."""
    out = stream or sys.stdout
    sender = journal_sender(out)
    render: Any = (JournalRenderer(sender) if sender is not None
                   else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def journal_sender(stream: TextIO) -> Any:
    """systemd.journal.sendv when `stream` is connected to journald (systemd
    sets JOURNAL_STREAM to its device:inode) and python3-systemd is there."""
    want = os.environ.get("JOURNAL_STREAM")
    if not want:
        return None
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    if want != f"{st.st_dev}:{st.st_ino}":
        return None
    try:
        journal: Any = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    return journal.sendv


def journal_fields(event: dict[str, Any]) -> list[str]:
    """An event as journal fields: MESSAGE is the JSON line (`journalctl -o
    cat` prints what stdout would have), PRIORITY its level, and every field
    as SMTPGUARD_<NAME> (strings as they are, anything else as JSON)."""
    line = json.dumps(event, default=str)
    fields = [f"MESSAGE={line}", f"PRIORITY={PRIORITY.get(str(event.get('level')), 6)}",
              "SYSLOG_IDENTIFIER=smtpguard"]
    for key, value in event.items():
        if key in ("level", "timestamp"):
            continue
        name = FIELD_PREFIX + _NOT_FIELD.sub("_", str(key).upper())
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        fields.append(f"{name[:64]}={text}")
    return fields


class JournalRenderer:
    """Last processor: sends the entry to the journal and drops it (structlog
    then writes nothing). If the journal refuses it, the JSON line goes to
    the stream as usual."""

    def __init__(self, sendv: Any) -> None:
        self.sendv = sendv

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        try:
            self.sendv(*journal_fields(event))
        except OSError:
            return json.dumps(event, default=str)
        raise structlog.DropEvent


def get(**bind: Any) -> Any:
    """A logger with fields bound; typed Any because structlog's proxy is."""
    return structlog.get_logger("smtpguard").bind(**bind)
