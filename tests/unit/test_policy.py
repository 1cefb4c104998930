"""Policy parsing: the shipped default is the built-in one, errors are located."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpguard.datapath.interfaces import classify
from smtpguard.policy import Policy, load_policy, load_text
from smtpguard.policy.load import PolicyErrors

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_default_is_the_builtin_default() -> None:
    """policies/default.yaml documents exactly what runs without --policy."""
    assert load_policy(ROOT / "policies" / "default.yaml") == Policy()


def test_errors_name_file_line_column_and_field() -> None:
    """Every error is reported, each with its location and field path."""
    text = "version: 1\nsmtp_ports: [25, 99999]\ninterfaces:\n  bogus: 1\n"
    with pytest.raises(PolicyErrors) as exc:
        load_text(text, "p.yaml")
    assert exc.value.errors == [
        "p.yaml:2:18: smtp_ports.1: Input should be less than or equal to 65535",
        "p.yaml:4:3: interfaces.bogus: unknown field",
    ]


def test_yaml_syntax_errors_are_located() -> None:
    with pytest.raises(PolicyErrors) as exc:
        load_text("smtp_ports: [25\n", "p.yaml")
    assert exc.value.errors[0].startswith("p.yaml:2:1: yaml: ")


@pytest.mark.parametrize("text", [
    "smtp_ports: []", "smtp_ports: [25, 25]", "version: 2",
    "datapath: {no_answer_after: 0s}", "datapath: {no_answer_after: soon}",
    "interfaces: {patterns: [{pattern: 'tap{vm}{vm}'}]}", "- 1",
])
def test_impossible_values_are_errors(text: str) -> None:
    with pytest.raises(PolicyErrors):
        load_text(text)


@pytest.mark.parametrize(("ifname", "alias", "vm", "pattern"), [
    ("tap100i0", None, "100", "tap{vm}i*"),
    ("tap100i1", None, "100", "tap{vm}i*"),
    ("tapd3f1a2b4-c5", None, "d3f1a2b4-c5", "tap{vm}"),
    ("vnet7", None, "vnet7", "vnet*"),
    ("vnet7", "web1", "web1", "vnet*"),
    ("vnet7", "not a name!", "vnet7", "vnet*"),
    ("fc-abc", None, "abc", "fc-{vm}"),
    ("veth-vm1", "vm1", "vm1", "veth*"),
])
def test_default_patterns_name_vms(ifname: str, alias: str | None, vm: str, pattern: str) -> None:
    """The first matching pattern wins; a plain ifalias overrides the captured name."""
    got = classify(7, ifname, alias, Policy().interfaces.patterns)
    assert got is not None and (got.vm, got.pattern) == (vm, pattern)


@pytest.mark.parametrize("ifname", ["eth0", "br0", "lo", "sink0", "bond0", "tap"])
def test_host_interfaces_are_not_vms(ifname: str) -> None:
    assert classify(1, ifname, None, Policy().interfaces.patterns) is None
