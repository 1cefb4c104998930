"""The fleet, with a real etcd and real agents, one per "host" (each in its
own lab): a blocked VM that moves to another host is blocked there from its
first SYN; a release on the new host is a release on the old one too; etcd
stopped under traffic costs no enforcement, and the hosts converge after."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fleetkit import URL, EtcdKit

from conftest import AgentProc, lab_with_agent, require_root, send, unique
from smtpguard.lab import topology

Pair = tuple[topology.Lab, AgentProc]
POLICY = """
version: 1
classes:
  default:
    port25: block
    limit: {{rate: 600/minute, burst: 50}}
    thresholds: []
fleet:
  endpoints: ["{url}"]
  prefix: /sgt/{run}
  host: {host}
  host_ttl: 6s
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[EtcdKit, Pair, Pair]]:
    """etcd, and hosts A (with vm1, vm2) and B (no VM yet)."""
    require_root()
    run = unique("sgf")
    kit = EtcdKit(run)
    with ExitStack() as stack:
        stack.callback(kit.down)
        kit.up()
        pairs = []
        for n, (host, vms) in enumerate((("hostA", 2), ("hostB", 0)), start=1):
            d = tmp_path / host
            d.mkdir()
            policy = d / "policy.yaml"
            policy.write_text(POLICY.format(url=URL, run=run, host=host))
            lab, agent = stack.enter_context(lab_with_agent(d, vms, policy, enforce=True,
                                                            start=False))
            kit.connect(lab, n)
            agent.start()
            agent.wait_event("fleet.connected", timeout=20)
            pairs.append((lab, agent))
        yield kit, pairs[0], pairs[1]


def row(agent: AgentProc, vm: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["vm"]: r for r in agent.ctl("status", "--json")}  # type: ignore[union-attr]
        if vm in rows and rows[vm]["interfaces"]:
            return rows[vm]
        assert time.monotonic() < deadline, f"{vm} not attached: {rows}"
        time.sleep(0.1)


def completed(lab: topology.Lab, vm: str, n: int) -> int:
    return send(lab, vm, n, port=587, timeout=2).get("completed", 0)


def record(kit: EtcdKit, vm: str, timeout: float = 10, **want: Any) -> dict[str, Any]:
    """The VM's record in etcd once it has these fields."""
    deadline = time.monotonic() + timeout
    while True:
        rec = kit.get(f"{kit.prefix}/vms/{vm}")
        if rec is not None and all(rec.get(k) == v for k, v in want.items()):
            return rec
        assert time.monotonic() < deadline, f"record {vm}: {rec}, wanted {want}"
        time.sleep(0.1)


def migrate(src: topology.Lab, dst: topology.Lab, vm: str) -> None:
    """The VM stops on src and starts on dst: its interface goes there,
    appears here, with the same identity (ifalias)."""
    topology.remove_vm(src, vm)
    n = len(dst.vms()) + 1
    topology.add_vm(dst, n)  # vmN, ifalias vmN
    if f"vm{n}" != vm:
        topology.replug_vm(dst, f"vm{n}", f"veth-vm{n}", vm)


def test_a_blocked_vm_is_blocked_on_the_host_it_moves_to(
        fleet: tuple[EtcdKit, Pair, Pair]) -> None:
    """Host B, which never ran vm1 and so never heard of it, has vm1's block
    from vm1's first SYN there (its record is read as its interface appears);
    a release on B reaches A's record and history (A holds the block it
    decided), and a block and a release on A, the old host, reach B."""
    kit, (lab_a, a), (lab_b, b) = fleet
    assert completed(lab_a, "vm1", 2) == 2
    a.ctl("block", "vm1", "--for", "1h", "--reason", "spam run")
    assert completed(lab_a, "vm1", 2) == 0
    rec = record(kit, "vm1", state="blocked", host="hostA")
    assert rec["actor"] == "operator:root" and rec["reason"] == "spam run"
    time.sleep(2)  # ample for a watch: B would have it by now, had it been sent
    assert not b.events("fleet.adopted")  # B runs none of A's VMs: it heard nothing
    assert b.metrics()["smtpguard_fleet_records_total"][(("direction", "received"),)] == 0

    migrate(lab_a, lab_b, "vm1")
    r = row(b, "vm1")
    assert r["state"] == "blocked", r
    # Read as its interface appeared, before the interface was enforced.
    ev = b.wait_event("fleet.arrived", vm="vm1")
    assert ev["state"] == "blocked" and ev["host"] == "hostA", ev
    assert abs(r["until"] - rec["until"]) < 1  # the remaining time, not a new hour
    assert completed(lab_b, "vm1", 3) == 0  # from its first SYN on B

    b.ctl("release", "vm1", "--reason", "ticket 42")
    assert completed(lab_b, "vm1", 2) == 2
    record(kit, "vm1", state="ok", host="hostB", reason="ticket 42")
    ev = a.wait_event("fleet.adopted", vm="vm1", state="ok")
    assert ev["host"] == "hostB" and ev["actor"] == "operator:root"
    hist = a.ctl_history("vm1")
    assert hist[-1]["new"] == "ok" and hist[-1]["reason"] == "ticket 42", hist

    # The old host's operator blocks it again, then releases it: both reach B.
    a.ctl("block", "vm1", "--for", "1h", "--reason", "again")
    b.wait_event("fleet.adopted", vm="vm1", state="blocked", reason="again")
    assert completed(lab_b, "vm1", 2) == 0
    a.ctl("release", "vm1", "--reason", "ticket 43")
    b.wait_event("fleet.adopted", vm="vm1", state="ok", reason="ticket 43")
    assert completed(lab_b, "vm1", 2) == 2


def test_etcd_down_for_a_minute_under_traffic(fleet: tuple[EtcdKit, Pair, Pair]) -> None:
    kit, (lab_a, a), (lab_b, b) = fleet
    a.ctl("block", "vm1", "--for", "1h", "--reason", "before the outage")
    record(kit, "vm1", state="blocked")
    kit.stop()
    t0 = time.monotonic()
    a.wait_event("fleet.unavailable", timeout=20)
    # Decisions go on locally while etcd is away, and wait to be published.
    a.ctl("block", "vm2", "--for", "1h", "--reason", "during the outage")
    outcomes = []
    while time.monotonic() - t0 < 60:
        outcomes.append((completed(lab_a, "vm1", 2), completed(lab_a, "vm2", 2)))
    assert outcomes and all(o == (0, 0) for o in outcomes), outcomes  # no lapse
    m = a.metrics()
    assert m["smtpguard_fleet_etcd_up"][()] == 0
    assert m["smtpguard_fleet_publish_queue"][()] == 1
    assert a.proc is not None and a.proc.poll() is None
    assert b.proc is not None and b.proc.poll() is None

    kit.start()
    record(kit, "vm2", timeout=30, state="blocked", reason="during the outage")
    deadline = time.monotonic() + 20
    while a.metrics()["smtpguard_fleet_publish_queue"][()] != 0 or \
            a.metrics()["smtpguard_fleet_etcd_up"][()] != 1:
        assert time.monotonic() < deadline, a.metrics()
        time.sleep(0.2)
    assert completed(lab_a, "vm1", 2) == 0
    # The block decided during the outage reaches the host vm2 moves to.
    migrate(lab_a, lab_b, "vm2")
    assert row(b, "vm2")["state"] == "blocked"
    assert b.wait_event("fleet.arrived", vm="vm2")["state"] == "blocked"
    assert completed(lab_b, "vm1", 2) == 0  # B's first VM namespace, vm2 by its identity


BUDGET = """
version: 1
classes:
  default:
    port25: block
    limit: {{rate: 600/minute, burst: 50}}
    throttle: {{rate: 5/minute, burst: 5}}
    thresholds: []
fleet:
  endpoints: ["{url}"]
  prefix: /sgt/{run}
  host: {host}
  tenant_budget: {{at_most: 60, window: 1m, share_every: 1s, action: throttle,
                  duration: 10m}}
"""


def test_a_tenant_budget_fires_on_the_sum_over_three_hosts(tmp_path: Path) -> None:
    """Tenant t has one VM on each of 3 hosts, each sending 25 new connections
    (under the budget of 60 on every host, 75 together): all three are
    throttled, on their own hosts; tenant u's VM beside them is not."""
    require_root()
    run = unique("sgf")
    kit = EtcdKit(run)
    with ExitStack() as stack:
        stack.callback(kit.down)
        kit.up()
        hosts: list[Pair] = []
        for n in (1, 2, 3):
            d = tmp_path / f"host{n}"
            d.mkdir()
            policy = d / "policy.yaml"
            policy.write_text(BUDGET.format(url=URL, run=run, host=f"host{n}"))
            lab, agent = stack.enter_context(lab_with_agent(d, 2 if n == 1 else 1, policy,
                                                            enforce=True, start=False))
            topology.replug_vm(lab, "vm1", "veth-vm1", f"vm=t{n} tenant=t")
            if n == 1:
                topology.replug_vm(lab, "vm2", "veth-vm2", "vm=u1 tenant=u")
            kit.connect(lab, n)
            agent.start()
            agent.wait_event("fleet.connected", timeout=20)
            hosts.append((lab, agent))
        for n, (_lab, agent) in enumerate(hosts, start=1):
            row(agent, f"t{n}")
        time.sleep(2)  # the detectors' first samples: the window starts there
        for lab, _agent in hosts[:2]:
            assert send(lab, "vm1", 25, port=587, timeout=5) == {"completed": 25}
        assert send(hosts[0][0], "vm2", 25, port=587, timeout=5) == {"completed": 25}
        time.sleep(4)  # every host has shared and added up (share_every 1s): 50 < 60
        assert not any(a.events("fleet.tenant_over_budget") for _lab, a in hosts)
        assert send(hosts[2][0], "vm1", 25, port=587, timeout=5) == {"completed": 25}
        for n, (_lab, agent) in enumerate(hosts, start=1):
            ev = agent.wait_event("fleet.tenant_over_budget", timeout=30, vm=f"t{n}")
            assert ev["attempts"] >= 60 and ev["hosts"] == ["host1", "host2", "host3"], ev
            assert ev["vms"] == ["t1", "t2", "t3"], ev
            r = row(agent, f"t{n}")
            assert r["state"] == "throttled", r
        assert row(hosts[0][1], "u1")["state"] == "ok"
        # The throttle is in the kernel: 5 a minute, burst 5.
        assert send(hosts[1][0], "vm1", 10, port=587, timeout=2).get("completed", 0) <= 5


FLEET_POLICY = """
version: 1
classes:
  default:
    port25: block
    limit: {{rate: 600/minute, burst: 50}}
    thresholds: []
fleet:
  endpoints: ["{url}"]
  prefix: /sgt/{run}
  host: hostA
  policy_prefix: /sgt/{run}/policy
"""


def test_the_policy_from_etcd_is_watched_validated_and_kept(tmp_path: Path) -> None:
    """Documents under fleet.policy_prefix are added to the local policy: a
    change applies on its own (generation = its etcd revision), a broken one
    is rejected naming its key, line and field with the last good one kept,
    and a restart while etcd is down starts from the last good one."""
    require_root()
    run = unique("sgf")
    kit = EtcdKit(run)
    with ExitStack() as stack:
        stack.callback(kit.down)
        kit.up()
        policy = tmp_path / "policy.yaml"
        policy.write_text(FLEET_POLICY.format(url=URL, run=run))
        lab, agent = stack.enter_context(lab_with_agent(tmp_path, 1, policy, enforce=True,
                                                        start=False))
        kit.connect(lab, 1)
        agent.start()
        agent.wait_event("fleet.connected", timeout=20)
        assert send(lab, "vm1", 2, port=25, timeout=2).get("completed", 0) == 0

        rev = kit.put(f"/sgt/{run}/policy/20-relaxed.yaml",
                      "classes:\n  default:\n    port25: allow\n")
        ev = agent.wait_event("policy.reloaded", timeout=20, policy_generation=rev)
        assert ev["interfaces"] == 1
        assert send(lab, "vm1", 2, port=25, timeout=2) == {"completed": 2}

        kit.put(f"/sgt/{run}/policy/30-broken.yaml", "classes:\n  default:\n    port25: opn\n")
        bad = agent.wait_event("policy.rejected", timeout=20)
        assert any(e.startswith(f"etcd:/sgt/{run}/policy/30-broken.yaml:3:") and "port25" in e
                   for e in bad["errors"]), bad
        assert send(lab, "vm1", 2, port=25, timeout=2) == {"completed": 2}  # the good one

        agent.stop()
        kit.stop()
        agent.start()  # etcd is down: it starts from the documents it last accepted
        assert agent.wait_event("policy.reloaded", timeout=20)["policy_generation"] == rev
        assert send(lab, "vm1", 2, port=25, timeout=2) == {"completed": 2}
