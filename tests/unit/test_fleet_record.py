"""The fleet's record and its rule for conflicting decisions (pure logic)."""

from __future__ import annotations

from smtpguard.detect.machine import VmRecord
from smtpguard.fleet.etcd import prefix_end
from smtpguard.fleet.record import FleetRecord


def test_a_record_goes_through_json_and_back_to_the_detectors() -> None:
    rec = VmRecord("web1", "blocked", since=100.0, until=3700.0, reason="spam run",
                   actor="operator:root", manual_until=3700.0, baseline=7.0)
    fr = FleetRecord.of(rec, "hv1", [10.0, 50.0])
    back = FleetRecord.from_json(fr.to_json())
    assert back == fr and back.blocks == (10.0, 50.0)
    assert back.vm_record(baseline=7.0) == rec  # the baseline is the host's own


def test_the_later_decision_wins_the_host_breaks_a_tie() -> None:
    block = FleetRecord("web1", "hv1", "blocked", since=100.0, until=3700.0)
    release = FleetRecord("web1", "hv2", "ok", since=200.0, actor="operator:root")
    assert release.newer_than(block.since, block.host)
    assert not block.newer_than(release.since, release.host)
    tie = FleetRecord("web1", "hv3", "throttled", since=200.0)
    assert tie.newer_than(release.since, release.host)  # "hv3" > "hv2"
    assert not release.newer_than(release.since, release.host)  # itself: not newer
    assert block.same_decision(FleetRecord("web1", "hv9", "blocked", 100.0, 3700.0))


def test_unknown_fields_from_a_newer_agent_are_ignored() -> None:
    text = '{"vm": "a", "host": "h", "state": "ok", "since": 1.0, "new_field": 3}'
    assert FleetRecord.from_json(text) == FleetRecord("a", "h", "ok", 1.0)


def test_prefix_range_end() -> None:
    assert prefix_end("/smtpguard/vms/") == "/smtpguard/vms0"


def test_a_fleet_section_with_a_bad_endpoint_is_a_located_error() -> None:
    import pytest

    from smtpguard.errors import SmtpguardError
    from smtpguard.policy import load_text

    with pytest.raises(SmtpguardError, match=r"p\.yaml:3:\d+: fleet\.endpoints.*etcd1:2379"):
        load_text("version: 1\nfleet:\n  endpoints: [etcd1:2379]\n", "p.yaml")
    with pytest.raises(SmtpguardError, match=r"fleet\.prefix"):
        load_text("version: 1\nfleet:\n  endpoints: [http://e:2379]\n  prefix: x/\n", "p.yaml")
    p = load_text("version: 1\nfleet:\n  endpoints: [https://e:2379]\n"
                  "  tenant_budget: {at_most: 10}\n", "p.yaml")
    assert p.fleet is not None and p.fleet.tenant_budget is not None
    assert p.fleet.tenant_budget.window == 3600.0
