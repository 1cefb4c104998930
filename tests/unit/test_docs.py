"""The README is the front page and the rest lives in docs/; every `smtpguard`
command line the pages quote parses with the real CLI.

Which lines count as command lines:
- in a code block (fenced, or indented by four spaces or more), every line
  that, after an optional prompt (`$ `, `# `) and `sudo`, starts with
  `smtpguard ` or a path to it (`.venv/bin/smtpguard `);
- in prose, every inline code span (it may wrap across lines) that starts
  the same way, except the few that quote something else (NOT_COMMANDS,
  each with its reason). A span that only names a command (`smtpguard lab`,
  `smtpguard libvirt-hook`: no options, no arguments) must name one the CLI
  has; its required arguments are not asked for.

How a line becomes an argv, without running anything: a trailing `# comment`
goes (shlex), optional parts in brackets are kept with the brackets removed
(the fullest form is checked: `[--interface vnet3]` -> `--interface vnet3`),
a lone `...` stands for one more argument (`x`), `FILE_OR_DIR...` for one,
and UPPERCASE placeholders take an example value from PLACEHOLDERS (an
unknown one fails, so a new placeholder gets a value on purpose). The argv
goes to the parser the CLI itself builds (`smtpguard.cli.main._parser`);
`parse_args` exiting (argparse's error) is a failure, except `--help`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from smtpguard.cli.main import _parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

PLACEHOLDERS = {
    "VM": "web1", "FILE": "policies/default.yaml", "FILE_OR_DIR": "policies/default.yaml",
    "DIR": "/var/lib/smtpguard", "PATH": "/run/smtpguard/control.sock", "TEXT": "ticket-42",
    "ID": "7", "A": "192.0.2.10", "M": "52:54:00:12:34:56", "T": "acme", "N": "3", "R": "10",
    "D": "20", "S": "60", "B": "nftables", "HOST:PORT": "127.0.0.1:9725", "DOMAIN": "web1",
    "OP": "prepare", "ADDRESS": "198.19.0.1", "NAME": "sglab-hv",
}
# Inline spans that start with "smtpguard " but are not command lines.
NOT_COMMANDS = {
    "smtpguard block/25 1a2b...": "an iptables rule's comment digest",
}
COMMAND = re.compile(r"^(?:[$#]\s+)?(?:sudo\s+)?(?:\S*/)?smtpguard\s+(.*)$", re.S)
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`]+)`")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _split(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(code lines, prose lines), each with its 1-based line number."""
    code, prose = [], []
    fenced, blank_before = False, True
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            blank_before = False
            continue
        indented = line.startswith("    ") and (blank_before or bool(code and code[-1][0] == n - 1))
        if fenced or (indented and not line.lstrip().startswith(("-", "*", "|"))):
            code.append((n, line.strip()))
        else:
            prose.append((n, line))
        blank_before = not line.strip()
    return code, prose


def quoted() -> list[tuple[str, str, bool]]:
    """(where, the command line as the page writes it, whether it is an inline
    span), README and docs/ pages."""
    out = []
    for page in pages():
        rel = page.relative_to(ROOT)
        code, prose = _split(page.read_text())
        for n, line in code:
            if COMMAND.match(line):
                out.append((f"{rel}:{n}", line, False))
        # Join prose so a span that wraps is one span; keep where each starts.
        starts, text = [], ""
        for n, line in prose:
            starts.append((len(text), n))
            text += line + "\n"
        for m in INLINE.finditer(text):
            span = " ".join(m.group(1).split())
            if COMMAND.match(span) and span not in NOT_COMMANDS:
                n = max(ln for off, ln in starts if off <= m.start())
                out.append((f"{rel}:{n}", span, True))
    return out


def argv_of(line: str) -> list[str]:
    """The argv after `smtpguard` that a documented line stands for."""
    m = COMMAND.match(line)
    assert m, line
    words = shlex.split(m.group(1).replace("[", " ").replace("]", " "), comments=True)
    argv = []
    for w in words:
        if w == "...":
            argv.append("x")
            continue
        bare = w.removesuffix("...")
        if re.fullmatch(r"[A-Z][A-Z_:]*", bare):
            assert bare in PLACEHOLDERS, f"no example value for placeholder {bare!r}"
            argv.append(PLACEHOLDERS[bare])
        else:
            argv.append(w)
    return argv


def names_a_command(argv: list[str]) -> bool:
    """argv is a path of subcommand names the CLI has (`lab`, `policy check`)."""
    parser = _parser()
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            return False
        parser = subs[0].choices[word]
    return bool(argv)


def parses(argv: list[str]) -> tuple[bool, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code == 0 and ("--help" in argv or "-h" in argv), err.getvalue().strip()
    return True, ""


COMMANDS = quoted()


def test_the_pages_quote_commands() -> None:
    """The collector finds the commands (an empty list would pass everything)."""
    assert len(COMMANDS) >= 30, COMMANDS
    assert any(where.startswith("README.md") for where, _, _ in COMMANDS)


@pytest.mark.parametrize(("where", "line", "inline"), COMMANDS,
                         ids=[w for w, _, _ in COMMANDS])
def test_documented_command_parses(where: str, line: str, inline: bool) -> None:
    """Every smtpguard command line in the README and docs/ is one the CLI accepts."""
    argv = argv_of(line)
    ok, why = parses(argv)
    named = inline and names_a_command(argv)
    assert ok or named, f"{where}: `{line}` -> smtpguard {shlex.join(argv)}: {why}"


def test_a_bogus_flag_does_not_parse() -> None:
    """The check can fail: an option the CLI lacks is refused."""
    assert parses(argv_of("smtpguard status --json"))[0]
    assert not parses(argv_of("smtpguard status --no-such-flag"))[0]
    assert not parses(argv_of("smtpguard block VM --reason TEXT"))[0]  # --for is required
    assert names_a_command(["lab"]) and names_a_command(["policy", "check"])
    assert not names_a_command(["lab", "--vms"]) and not names_a_command(["blok"])


def test_readme_is_a_front_page() -> None:
    """The README stays short; the rest lives in docs/."""
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """A page nobody links to is a page nobody finds."""
    readme = README.read_text()
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name}" not in readme]
    assert DOCS.is_dir() and not missing, missing


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation gone, spaces to hyphens."""
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_and_anchors_resolve() -> None:
    """A link between pages (and its #anchor) points at something that exists."""
    bad = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: {target} (no such anchor)")
    assert not bad, bad
