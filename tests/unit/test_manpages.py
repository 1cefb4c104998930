"""The man pages the package ships, man/smtpguard.8 and man/smtpguard-policy.5,
follow the code they document.

- smtpguard(8): every command of the parser the CLI builds
  (`smtpguard.cli.main._parser`, as tests/unit/test_docs.py takes it) has its
  own subsection under COMMANDS (`.SS "policy check"`) and a line in the
  SYNOPSIS (`.B smtpguard policy check`); every long option of a command is
  written in that command's subsection, escaped (`\\-\\-state\\-dir`); an option
  a subsection lists (a `.TP` tag) is one the command has; the global options
  are under OPTIONS; the EXAMPLES parse.
- smtpguard-policy(5): under FIELDS, each section of the policy model has a
  subsection named by its path (`.SS inventory.libvirt`, `classes.NAME` for a
  mapping's values, `members[]` for a list's items, `top level` for the
  policy itself) whose `.TP` tags are exactly that model's fields; the
  EXAMPLE is a valid policy.
- .TH carries each page's name and section.

Pure text and introspection: nothing runs, nothing is formatted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from smtpguard.cli.main import _parser
from smtpguard.policy.load import load_text
from smtpguard.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
AGENT_PAGE = ROOT / "man" / "smtpguard.8"
POLICY_PAGE = ROOT / "man" / "smtpguard-policy.5"
TOP_LEVEL = "top level"  # the policy page's heading for Policy's own fields


# -- roff, read as text ---------------------------------------------------------
def escape(text: str) -> str:
    """How a page writes a literal name: every hyphen as \\-."""
    return text.replace("-", "\\-")


def unescape(text: str) -> str:
    """The text a roff line stands for, for the escapes these pages use."""
    for roff, plain in (("\\-", "-"), ("\\(aq", "'"), ("\\(dq", '"'), ("\\e", "\\"),
                        ("\\&", ""), ("\\%", "")):
        text = text.replace(roff, plain)
    return re.sub(r"\\f[BIRP]", "", text)


def _title(line: str) -> str:
    """A heading macro's argument, quotes and escapes gone."""
    return unescape(line.split(None, 1)[1].strip().strip('"')) if " " in line else ""


def sections(text: str) -> dict[str, list[str]]:
    """.SH title -> its lines (without the .SH line)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(".SH"):
            current = out.setdefault(_title(line), [])
        elif current is not None:
            current.append(line)
    return out


def subsections(lines: list[str]) -> dict[str, list[str]]:
    """.SS title -> its lines, within one .SH section."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith(".SS"):
            title = _title(line)
            assert title not in out, f".SS {title!r} appears twice"
            current = out[title] = []
        elif current is not None:
            current.append(line)
    return out


def tags(lines: list[str]) -> list[str]:
    """The tag line of every .TP paragraph."""
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.split()[:1] == [".TP"]]


def field_of(tag: str) -> str:
    """The field a policy page's tag names: the first argument of .B/.BR."""
    m = re.match(r'^\.(?:B|BR)\s+"?([^"\s]+)', tag)
    assert m, f"a field's tag is .BR name \" (type; default)\": {tag!r}"
    return unescape(m.group(1))


def options_in(text: str) -> set[str]:
    """The long options a piece of roff writes (escaped: \\-\\-name)."""
    return {unescape(m) for m in re.findall(r"\\-\\-[a-z0-9]+(?:\\-[a-z0-9]+)*", text)}


def examples(lines: list[str]) -> list[str]:
    """The text of every .EX/.EE block, unescaped."""
    out: list[str] = []
    block: list[str] | None = None
    for line in lines:
        if line.startswith(".EX"):
            block = []
        elif line.startswith(".EE"):
            assert block is not None
            out.append("\n".join(block) + "\n")
            block = None
        elif block is not None:
            block.append(unescape(line))
    return out


AGENT = AGENT_PAGE.read_text()
POLICY = POLICY_PAGE.read_text()
AGENT_SECTIONS = sections(AGENT)
POLICY_SECTIONS = sections(POLICY)
COMMAND_PAGES = subsections(AGENT_SECTIONS.get("COMMANDS", []))
FIELD_PAGES = subsections(POLICY_SECTIONS.get("FIELDS", []))


# -- the parser -----------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(parser: argparse.ArgumentParser | None = None,
             path: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every command the CLI runs ("policy check", "status", ...) -> its parser:
    the leaves of the tree of subparsers."""
    parser = parser or _parser()
    subs = _subparsers(parser)
    if not subs:
        return {" ".join(path): parser}
    out: dict[str, argparse.ArgumentParser] = {}
    for name, sub in subs.items():
        out.update(commands(sub, (*path, name)))
    return out


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


COMMANDS = commands()


# -- the policy model -----------------------------------------------------------
def _models(annotation: object) -> list[tuple[str, type[BaseModel]]]:
    """The models a field's type holds, each with the path suffix its values
    take: '' (the field itself), '[]' (a list's items), '.NAME' (a mapping's)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin is typing.Annotated:
        return _models(args[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in _models(a)]
    if origin is tuple:
        return [("[]" + s, m) for a in args if a is not Ellipsis for s, m in _models(a)]
    if origin is dict:
        return [(".NAME" + s, m) for s, m in _models(args[1])]
    return []


def policy_sections(model: type[BaseModel] = Policy,
                    path: str = "") -> dict[str, type[BaseModel]]:
    """Every section of the policy: its path (`classes.NAME.thresholds[]`) ->
    its model."""
    out = {path or TOP_LEVEL: model}
    for name, info in model.model_fields.items():
        key = info.alias or name
        for suffix, sub in _models(info.annotation):
            out.update(policy_sections(sub, f"{path}.{key}{suffix}" if path else key + suffix))
    return out


def field_names(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


SECTIONS = policy_sections()


def heading_of(path: str) -> str | None:
    """The FIELDS subsection that documents a section: one heading may name
    several paths of one model, comma-separated."""
    for heading in FIELD_PAGES:
        if path in [p.strip() for p in heading.split(",")]:
            return heading
    return None


# -- smtpguard(8) ---------------------------------------------------------------
def test_th_lines() -> None:
    """Each page's .TH names it and its section; NAME is `name \\- summary`."""
    assert re.search(r"^\.TH SMTPGUARD 8 ", AGENT, re.M)
    assert re.search(r"^\.TH SMTPGUARD\\-POLICY 5 ", POLICY, re.M)
    assert AGENT_SECTIONS["NAME"][0].startswith("smtpguard \\- ")
    assert POLICY_SECTIONS["NAME"][0].startswith("smtpguard\\-policy \\- ")


def test_the_walk_finds_the_commands() -> None:
    """The parser walk sees nested commands (an empty walk would pass all)."""
    assert {"run", "policy check", "lab send", "incidents", "libvirt-hook",
            "version"} <= set(COMMANDS)
    assert "--state-dir" in long_options(COMMANDS["run"])


def test_every_command_has_its_subsection() -> None:
    """COMMANDS has one .SS per command the parser has, and none it lacks."""
    documented = set(COMMAND_PAGES)
    assert documented == set(COMMANDS), (
        f"undocumented: {sorted(set(COMMANDS) - documented)}; "
        f"no such command: {sorted(documented - set(COMMANDS))}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_is_in_the_synopsis(command: str) -> None:
    synopsis = AGENT_SECTIONS["SYNOPSIS"]
    assert f".B smtpguard {escape(command)}" in synopsis, f"SYNOPSIS lacks {command}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_long_option_is_documented_under_its_command(command: str) -> None:
    """Written escaped (\\-\\-name) in the command's subsection; and every
    option a subsection's .TP tags list is one the command has."""
    body = "\n".join(COMMAND_PAGES.get(command, []))
    options = long_options(COMMANDS[command])
    missing = sorted(o for o in options if escape(o) not in body)
    assert not missing, f"smtpguard {command}: {missing} not in smtpguard.8"
    listed = set().union(*(options_in(t) for t in tags(COMMAND_PAGES.get(command, []))))
    assert listed <= options, f"smtpguard {command} has no {sorted(listed - options)}"


def test_global_options_are_under_options() -> None:
    body = "\n".join(AGENT_SECTIONS["OPTIONS"])
    missing = sorted(o for o in long_options(_parser()) | {"--help"} if escape(o) not in body)
    assert not missing, missing


def _parses(argv: list[str]) -> str:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _parser().parse_args(argv)
    except SystemExit:
        return err.getvalue().strip() or "exit"
    return ""


def test_the_examples_parse() -> None:
    """Every `smtpguard ...` line of EXAMPLES is a command line the CLI accepts."""
    lines = [ln for block in examples(AGENT_SECTIONS["EXAMPLES"])
             for ln in block.replace("\\\n", " ").splitlines()
             if ln.startswith("smtpguard ")]
    assert len(lines) >= 5, lines
    bad = {ln: why for ln in lines if (why := _parses(shlex.split(ln)[1:]))}
    assert not bad, bad


def packaged_venv() -> list[str]:
    """The virtualenv the Debian package links /usr/bin/smtpguard into
    (debian/smtpguard.links), when the checkout has the packaging."""
    links = ROOT / "debian" / "smtpguard.links"
    if not links.exists():
        return []
    for line in links.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[1] == "usr/bin/smtpguard":
            return ["/" + str(Path(words[0]).parent.parent)]
    raise AssertionError("debian/smtpguard.links does not link usr/bin/smtpguard")


def test_files_and_see_also() -> None:
    """FILES lists the packaged layout, each path as a .B tag."""
    files = "\n".join(AGENT_SECTIONS["FILES"]) + "\n"
    for path in ("/etc/smtpguard/policy.yaml", "/etc/default/smtpguard", "/var/lib/smtpguard",
                 "/run/smtpguard/control.sock", "/sys/fs/bpf/smtpguard", "/usr/bin/smtpguard",
                 "/etc/libvirt/hooks/qemu.d/smtpguard", "/usr/share/smtpguard",
                 "/usr/share/doc/smtpguard", *packaged_venv()):
        assert f".B {escape(path)}\n" in files, path
    assert "smtpguard\\-policy (5)" in "\n".join(AGENT_SECTIONS["SEE ALSO"])
    assert "smtpguard (8)" in "\n".join(POLICY_SECTIONS["SEE ALSO"])


# -- smtpguard-policy(5) --------------------------------------------------------
def test_the_walk_finds_the_sections() -> None:
    """The model walk reaches nested sections (an empty walk would pass all)."""
    assert {TOP_LEVEL, "interfaces.patterns[]", "inventory.ovs", "classes.NAME",
            "classes.NAME.thresholds[]", "classes.NAME.limit", "members[]",
            "fleet.tenant_budget", "fleet.tls"} <= set(SECTIONS)
    assert "class" in field_names(SECTIONS["members[]"])  # by its alias


@pytest.mark.parametrize("path", sorted(SECTIONS))
def test_every_field_is_documented_in_its_section(path: str) -> None:
    """The section's subsection lists exactly the model's fields as .TP tags."""
    heading = heading_of(path)
    assert heading is not None, f"smtpguard-policy.5 has no .SS for {path}"
    documented = [field_of(t) for t in tags(FIELD_PAGES[heading])]
    assert len(documented) == len(set(documented)), f"{heading}: a field twice: {documented}"
    want = field_names(SECTIONS[path])
    assert set(documented) == want, (
        f"{heading}: undocumented {sorted(want - set(documented))}, "
        f"no such field {sorted(set(documented) - want)}")


def test_no_subsection_for_a_section_the_model_lacks() -> None:
    paths = {p.strip() for heading in FIELD_PAGES for p in heading.split(",")}
    assert paths <= set(SECTIONS), sorted(paths - set(SECTIONS))


def test_the_example_is_a_valid_policy() -> None:
    blocks = examples(POLICY_SECTIONS["EXAMPLE"])
    assert len(blocks) == 1
    policy = load_text(blocks[0], "smtpguard-policy.5 EXAMPLE")
    assert len(policy.classes) > 1 and policy.members and policy.webhook is not None
