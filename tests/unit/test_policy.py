"""Policy parsing: shipped files, every field's errors with their location,
units, first-match membership and the directory merge."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpguard.inventory.resolve import Resolver
from smtpguard.policy import Policy, PolicyErrors, load_path, load_policy, load_text
from smtpguard.policy.load import load_documents
from smtpguard.policy.membership import VmFacts, place
from smtpguard.policy.units import Rate, format_duration, parse_duration, parse_rate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(p for p in ROOT.glob("policies/**/*.yaml") if p.parent.suffix != ".d"),
                  *ROOT.glob("policies/**/*.d")])


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyErrors) as exc:
        load_text(text, "p.yaml")
    return exc.value.errors


def test_shipped_default_is_the_builtin_default() -> None:
    """policies/default.yaml spells out exactly what runs without --policy."""
    assert load_policy(ROOT / "policies" / "default.yaml") == Policy()


def test_builtin_default_blocks_25_and_limits_submission() -> None:
    c = Policy().classes["default"]
    assert c.port25 == "block" and c.limit is not None
    assert set(c.limited_ports) == {465, 587, 2525}
    assert {t.action for t in c.thresholds} == {"flag", "throttle", "block"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_policy_validates(path: Path) -> None:
    load_path(path)


def test_errors_name_file_line_column_and_field() -> None:
    """Every error is reported, each with its location and field path."""
    assert errors_of("version: 1\nsmtp_ports: [25, 99999]\ninterfaces:\n  bogus: 1\n") == [
        "p.yaml:2:18: smtp_ports.1: Input should be less than or equal to 65535",
        "p.yaml:4:3: interfaces.bogus: unknown field",
    ]


def test_yaml_syntax_errors_are_located() -> None:
    (err,) = errors_of("smtp_ports: [25\n")
    assert err.startswith("p.yaml:2:1: yaml: ")


def test_unknown_yaml_tags_are_located_errors() -> None:
    """A YAML tag no safe constructor knows (found by the fuzzer) is a located
    error, not a crash."""
    assert errors_of("version: 1\n!A relays: []\n") == [
        "p.yaml:2:1: policy: could not determine a constructor for the tag '!A'"]


def test_duplicate_keys_are_errors() -> None:
    assert errors_of("relays: []\nversion: 1\nrelays: []\n") == [
        "p.yaml:3:1: relays: duplicate key (first at 1)"]


CASES = [
    # (yaml, expected "line:col: field: message" prefix)
    ("version: 2", "1:10: version: Input should be 1"),
    ("smtp_ports: []", "1:13: smtp_ports: at least one SMTP port"),
    ("smtp_ports: [25, 25]", "1:13: smtp_ports: ports are listed more than once"),
    ("smtp_ports: [0]", "1:14: smtp_ports.0: Input should be greater than or equal to 1"),
    ("relays: [198.51.100.1/24]", "1:10: relays.0: '198.51.100.1/24' is not an"),
    ("relays: [10.0.0.0/8, 10.1.0.0/16]", "1:22: relays.1: 10.1.0.0/16 overlaps relays.0"),
    ("relays: [fe80::/10, 'fe80::1/128']", "1:21: relays.1: fe80::1/128 overlaps relays.0"),
    ("interfaces: {patterns: []}", "1:24: interfaces.patterns: Tuple should have at least 1"),
    ("interfaces: {patterns: [{pattern: 'tap{vm}{vm}'}]}",
     "1:35: interfaces.patterns.0.pattern: only one {vm}"),
    ("interfaces: {patterns: [{pattern: a}, {pattern: a}]}",
     "1:49: interfaces.patterns.1.pattern: 'a' is listed twice"),
    ("interfaces: {vm_from_ifalias: maybe}",
     "1:31: interfaces.vm_from_ifalias: Input should be a valid boolean"),
    ("datapath: {no_answer_after: 0s}",
     "1:29: datapath.no_answer_after: a duration must be positive"),
    ("datapath: {no_answer_after: soon}",
     "1:29: datapath.no_answer_after: 'soon' is not a duration"),
    ("classes: {}", "1:10: classes: Dictionary should have at least 1 item"),
    ("classes: {Bad: {}}\ndefault_class: Bad",
     "1:11: classes.Bad.[key]: 'Bad': names are lower-case"),
    ("classes: {default: {port25: maybe}}",
     "1:29: classes.default.port25: Input should be 'block', 'limit', 'allow' or 'redirect'"),
    ("classes: {default: {port25: redirect}}",
     "1:20: classes.default.redirect_to: port25: redirect needs the relay to send to"),
    ("classes: {default: {port25: allow, redirect_to: [198.51.100.25]}}",
     "1:49: classes.default.redirect_to: only used with port25: redirect"),
    ("classes: {default: {port25: redirect, redirect_to: [198.51.100.25, 198.51.100.26]}}",
     "1:52: classes.default.redirect_to: at most one IPv4 and one IPv6 address"),
    ("classes: {default: {port25: redirect, redirect_to: [not-an-ip]}}",
     "1:53: classes.default.redirect_to.0: 'not-an-ip' is not an IP address"),
    ("classes: {default: {limit: {rate: 20/fortnight, burst: 1}}}",
     "1:35: classes.default.limit.rate: '20/fortnight': unknown unit"),
    ("classes: {default: {limit: {rate: 0/minute, burst: 1}}}",
     "1:35: classes.default.limit.rate: a rate must be positive"),
    ("classes: {default: {limit: {rate: 20/minute, burst: 0}}}",
     "1:53: classes.default.limit.burst: Input should be greater than or equal to 1"),
    ("classes: {default: {limit: {rate: 20/minute}}}",
     "1:28: classes.default.limit.burst: Field required"),
    ("classes: {default: {limited_ports: [25]}}",
     "1:36: classes.default.limited_ports: port 25 is governed by port25:"),
    ("classes: {default: {limit: null}}",
     "1:28: classes.default.limit: port25: limit and limited_ports need a limit"),
    ("classes: {default: {throttle: {rate: 30/minute, burst: 5}}}",
     "1:38: classes.default.throttle.rate: 30/minute must be tighter than the limit"),
    ("classes: {default: {thresholds: [{metric: hits, window: 1m, at_least: 5, action: flag}]}}",
     "1:43: classes.default.thresholds.0.metric: Input should be 'attempts'"),
    ("classes: {default: {thresholds: [{metric: attempts, window: 5s, at_least: 5, "
     "action: flag}]}}", "1:61: classes.default.thresholds.0.window: must be between 10s"),
    ("classes: {default: {thresholds: [{metric: destinations, window: 2h, at_least: 5, "
     "action: flag}]}}", "1:65: classes.default.thresholds.0.window: destinations are"),
    ("classes: {default: {thresholds: [{metric: attempts, window: 1m, at_least: 5, "
     "action: block}]}}", "1:34: classes.default.thresholds.0.duration: a block needs"),
    ("classes: {default: {thresholds: [{metric: attempts, window: 1m, at_least: 5, "
     "action: flag, duration: 1h}]}}",
     "1:102: classes.default.thresholds.0.duration: a flag has no duration"),
    ("classes: {default: {thresholds: [{metric: attempts, window: 1m, at_least: 0, "
     "action: flag}]}}",
     "1:75: classes.default.thresholds.0.at_least: Input should be greater than or equal"),
    ("classes: {default: {thresholds: [{name: a, metric: attempts, window: 1m, at_least: 5, "
     "action: flag}, {name: a, metric: attempts, window: 1m, at_least: 6, action: flag}]}}",
     "1:109: classes.default.thresholds.1.name: 'a' is used twice"),
    ("classes: {default: {thresholds: [{metric: attempts, window: 1m, at_least: 5, "
     "action: block, duration: 30d}]}}",
     "1:103: classes.default.thresholds.0.duration: longer than escalation.max"),
    ("classes: {default: {escalation: {factor: 0.5}}}",
     "1:42: classes.default.escalation.factor: Input should be greater than or equal to 1"),
    ("default_class: gone", "1:16: default_class: no class 'gone'"),
    ("members: [{class: gone, vm: x}]", "1:19: members.0.class: no class 'gone'"),
    ("members: [{class: default}]", "1:11: members.0: a rule needs at least one"),
    ("members: [{class: default, mac: nope}]",
     "1:33: members.0.mac: 'nope' is not a MAC address"),
    ("members: [{class: default, ip: 10.0.0.1/8}]",
     "1:32: members.0.ip: '10.0.0.1/8' is not an address or CIDR"),
    ("members: [{class: default, vm: x, color: red}]", "1:35: members.0.color: unknown field"),
    ("webhook: {url: ftp://x}", "1:16: webhook.url: 'ftp://x' is not an http"),
    ("webhook: {url: 'https://x', events: [exploded]}",
     "1:38: webhook.events.0: Input should be 'flagged'"),
    ("smtp_ports: [2026]\nclasses: {default: {}}",
     "2:20: classes.default.limited_ports.0: 465 is not in smtp_ports"),
    ("- 1", "1:1: policy: must be a mapping of settings"),
    ("metrics: {active_within: 10s}", "1:26: metrics.active_within: must be between 1m and 30d"),
    ("metrics: {active_within: 31d}", "1:26: metrics.active_within: must be between 1m and 30d"),
    ("metrics: {window: 1h}", "1:11: metrics.window: unknown field"),
]


@pytest.mark.parametrize(("text", "want"), CASES, ids=[c[1].split(": ")[1] + str(i)
                                                       for i, c in enumerate(CASES)])
def test_every_field_rejects_bad_values_at_their_location(text: str, want: str) -> None:
    errs = errors_of(text)
    assert any(e.startswith(f"p.yaml:{want}") for e in errs), errs


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("5m", 300), ("1.5h", 5400), ("1d", 86400), ("2w", 1209600), ("10 min", 600),
    (90, 90), (0.5, 0.5),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "-1s", "0s", True, None, "1h30m"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "per_second", "shown"), [
    ("20/minute", 20 / 60, "20/minute"), ("600/hour", 600 / 3600, "600/hour"),
    ("5/s", 5, "5/second"), ("100/10m", 100 / 600, "100/10m"), ("1/day", 1 / 86400, "1/day"),
    ("2.5/min", 2.5 / 60, "2.5/minute"),
])
def test_rates(text: str, per_second: float, shown: str) -> None:
    r = parse_rate(text)
    assert r.per_second == pytest.approx(per_second)
    assert str(r) == shown


@pytest.mark.parametrize("text", ["20", "20/", "/minute", "20/eon", "0/minute", "x/minute"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (30, 60, 5400, 7200, 86400)] == [
        "30s", "1m", "90m", "2h", "1d"]


MEMBERS = """
version: 1
classes: {default: {}, a: {}, b: {}, c: {}}
members:
  - {class: a, vm: "mail-*", tenant: acme}
  - {class: b, tenant: acme}
  - {class: c, ip: 203.0.113.0/24}
  - {class: c, ip: "2001:db8::/32"}
  - {class: a, mac: "52:54:00:AA:BB:CC"}
  - {class: b, interface: "tap1*"}
"""


@pytest.mark.parametrize(("facts", "cls", "rule"), [
    (VmFacts("mail-1", tenant="acme"), "a", 0),  # all criteria of rule 0 match
    (VmFacts("mail-1", tenant="other"), "default", None),  # one criterion is not enough
    (VmFacts("web", tenant="acme", ips=("203.0.113.5",)), "b", 1),  # first match wins
    (VmFacts("web", ips=("198.51.100.1", "203.0.113.5")), "c", 2),  # any of its addresses
    (VmFacts("web", ips=("2001:db8::7",)), "c", 3),
    (VmFacts("web", mac="52:54:00:aa:bb:cc"), "a", 4),
    (VmFacts("web", interface="tap100i0"), "b", 5),
    (VmFacts("web"), "default", None),  # unknown facts never match
])
def test_first_match_wins(facts: VmFacts, cls: str, rule: int | None) -> None:
    p = place(load_text(MEMBERS), facts)
    assert (p.cls, p.rule) == (cls, rule)


def test_directory_merge(tmp_path: Path) -> None:
    """Mappings merge key by key, relays and members concatenate in name order,
    other lists and values are replaced by the later file; errors point into
    the file that wrote the value."""
    (tmp_path / "10-base.yaml").write_text(
        "version: 1\nrelays: [198.51.100.25/32]\nsmtp_ports: [25, 587]\n"
        "classes:\n  default: {port25: block, limited_ports: [587]}\n"
        "  verified: {port25: limit, limited_ports: [587]}\n"
        "members: [{class: verified, tenant: acme}]\n")
    (tmp_path / "50-more.yaml").write_text(
        "relays: ['2001:db8:25::/64']\nsmtp_ports: [25, 587, 2525]\n"
        "classes:\n  verified: {limit: {rate: 600/hour, burst: 50}}\n"
        "members: [{class: verified, vm: 'mx-*'}]\n")
    (tmp_path / "README.txt").write_text("not a policy")
    loaded = load_path(tmp_path)
    p = loaded.policy
    assert [str(r) for r in p.relays] == ["198.51.100.25/32", "2001:db8:25::/64"]
    assert p.smtp_ports == (25, 587, 2525)
    assert p.classes["verified"].port25 == "limit"  # kept from 10-base
    assert str(p.classes["verified"].limit.rate) == "600/hour"  # type: ignore[union-attr]
    assert [m.tenant or m.vm for m in p.members] == ["acme", "mx-*"]
    assert loaded.where("members.1").startswith(str(tmp_path / "50-more.yaml") + ":5:")
    assert loaded.where("members.0").startswith(str(tmp_path / "10-base.yaml") + ":7:")
    (tmp_path / "60-bad.yaml").write_text("classes:\n  verified: {port25: sometimes}\n")
    with pytest.raises(PolicyErrors) as exc:
        load_path(tmp_path)
    assert exc.value.errors[0].startswith(f"{tmp_path / '60-bad.yaml'}:2:22: classes.verified")


@pytest.mark.parametrize("text", [
    "", "\n\n", "# relays: [198.51.100.25/32]\n", "---\n", "  \n# x\n"])
def test_an_empty_policy_is_one_located_error(text: str) -> None:
    """An empty or comment-only file (a truncated write) is not "all
    defaults": it is one error at FILE:1:1 naming `version`."""
    assert errors_of(text) == [
        "p.yaml:1:1: version: required, and this file is empty (only comments or whitespace)"]


def test_version_is_required() -> None:
    """Settings without `version` are an error at 1:1, reported with the others."""
    assert errors_of("relays: []\n") == [
        "p.yaml:1:1: version: required (the schema's version: `version: 1`)"]
    errs = errors_of("\nsmtp_ports: [0]\n")
    assert errs[0] == "p.yaml:1:1: version: required (the schema's version: `version: 1`)"
    assert errs[1].startswith("p.yaml:2:14: smtp_ports.0: ")


def test_an_empty_file_in_a_directory_is_an_error(tmp_path: Path) -> None:
    """In a directory too, an empty file is a located error; `version` may be
    said by any one file."""
    (tmp_path / "10-base.yaml").write_text("version: 1\nrelays: [198.51.100.25/32]\n")
    (tmp_path / "50-more.yaml").write_text("members: []\n")
    load_path(tmp_path)
    (tmp_path / "60-empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(PolicyErrors) as exc:
        load_path(tmp_path)
    assert exc.value.errors == [f"{tmp_path / '60-empty.yaml'}:1:1: version: required, "
                                "and this file is empty (only comments or whitespace)"]


def test_errors_in_several_files_are_all_reported() -> None:
    with pytest.raises(PolicyErrors) as exc:
        load_documents([("a.yaml", "x: [\n"), ("b.yaml", "- 1\n")])
    assert [e.split(":")[0] for e in exc.value.errors] == ["a.yaml", "b.yaml"]


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyErrors, match="No such file"):
        load_path(tmp_path / "nope.yaml")
    with pytest.raises(PolicyErrors, match=r"no \*.yaml files"):
        load_path(tmp_path)


def test_rate_model_default_is_per_minute() -> None:
    assert Policy().classes["default"].limit.rate == Rate(20, 60)  # type: ignore[union-attr]


@pytest.mark.parametrize(("ifname", "alias", "vm", "pattern"), [
    ("tap100i0", None, "100", "tap{vm}i*"),
    ("tap100i1", None, "100", "tap{vm}i*"),
    ("tapd3f1a2b4-c5", None, "d3f1a2b4-c5", "tap{vm}"),
    ("vnet7", None, "vnet7", "vnet*"),
    ("vnet7", "web1", "web1", "vnet*"),
    ("vnet7", "not a name!", "vnet7", "vnet*"),
    ("fc-abc", None, "abc", "fc-{vm}"),
    ("veth-vm1", "vm1", "vm1", "veth*"),
    ("vnet8", "vm=db1 tenant=acme", "db1", "vnet*"),
    ("vnet8", "tenant=acme", "vnet8", "vnet*"),
])
def test_default_patterns_name_vms(ifname: str, alias: str | None, vm: str, pattern: str) -> None:
    """The first matching pattern wins; a plain ifalias overrides the captured name."""
    got = Resolver().identify(7, ifname, alias, Policy().interfaces.patterns)
    assert got is not None and (got.vm, got.pattern) == (vm, pattern)


def test_ifalias_gives_tenant() -> None:
    got = Resolver().identify(7, "vnet8", "vm=db1 tenant=acme", Policy().interfaces.patterns)
    assert got is not None and (got.vm, got.tenant) == ("db1", "acme")
    got = Resolver().identify(7, "vnet8", "vm=db1 tenant=acme", Policy().interfaces.patterns, False)
    assert got is not None and (got.vm, got.tenant) == ("vnet8", None)


@pytest.mark.parametrize("ifname", ["eth0", "br0", "lo", "sink0", "bond0", "tap"])
def test_host_interfaces_are_not_vms(ifname: str) -> None:
    assert Resolver().identify(1, ifname, None, Policy().interfaces.patterns) is None
