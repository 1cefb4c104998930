"""A real agent against libvirt domains that are not Linux bridge ports.

macvtap: a domain with `<interface type='direct'><source dev=LOWER
mode='bridge'/>`, LOWER a veth (sgmv<5 hex>l) whose peer is the sink's, in
the sink's namespace, like a host's uplink NIC and the network behind it.
libvirt makes a macvtapN on LOWER; what the guest sends leaves through that
device's *transmit* path (tc egress and netfilter's netdev egress hook of
macvtapN), and the answers come in through its receive path. The peer is
not a port of the kit's br0 on purpose: there the agent's bridge table
(which rejects any SYN carrying the trip mark, whatever its port) would stop
what the macvtap's own enforcement let through, and hide its failure.

The agent runs the built-in default policy (its `macvtap*` pattern, its
ceilings: 587 limited to 20/minute, burst 10; port 25 blocked), only naming
VMs from the kit's libvirtd.

A macvtap in passthrough mode (the guest takes the whole lower device) is
still a macvtap in the host kernel, and is covered the same way.

Uncovered: domains whose traffic never crosses the host kernel (vhost-user,
an SR-IOV VF as `type='hostdev'`), defined and not started (libvirt 9
accepts their definition without the socket or the PCI device, and without
shared memory for vhost-user; it refuses only at start).

One agent and one macvtap domain serve the module; the tests run in order
(each one's figures are deltas, so a test also passes on its own). The
figures are printed (`pytest -s`) and recorded as properties.
"""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import agentkit
import guest
import pytest
from agentkit import events_since, rows, ts, wait_events, wait_row
from libvirtd import Domain, Libvirtd

from integration.conftest import AgentProc

N = 5  # connections per step: under the default ceiling on 587 (burst 10)
ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
HANDSHAKES = "smtpguard_smtp_handshakes_total"
BLOCKED = "smtpguard_smtp_blocked_attempts_total"
INFO = "smtpguard_vm_info"
UNCOVERED = "smtpguard_vms_uncovered"


@pytest.fixture(scope="module")
def agent(hv: Libvirtd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    a = agentkit.start_agent(hv, tmp_path_factory.mktemp("agent"),
                             agentkit.default_policy_text(hv))
    try:
        yield a
    finally:
        agentkit.stop_agent(a)


@dataclass(frozen=True)
class Uplink:
    """A macvtap's lower device, and the guest's addresses behind it."""

    lower: str
    addr4: str  # the guest's, without prefix length
    addr6: str
    net: dict[str, str]  # guest.cmdline() keywords: ip, gw, ip6, gw6


@contextlib.contextmanager
def uplink(hv: Libvirtd, subnet: int) -> Iterator[Uplink]:
    """A veth pair from the hypervisor namespace into the sink's
    (hostnet.Network.add_uplink) on 198.18.<subnet>.0/24 and
    fdac:29:<subnet>::/64, the sink .2, the guest .31; its ends are named
    sgmv<5 hex>l and sgmv<5 hex>s, which no default pattern (veth*, vnet*,
    tap*, fc-*, macvtap*) matches. Deleted after."""
    tag = uuidlib.uuid4().hex[:5]
    v4, v6 = f"198.18.{subnet}.", f"fdac:29:{subnet}::"
    name = hv.net.add_uplink(f"sgmv{tag}l", f"sgmv{tag}s", f"{v4}2/24", f"{v6}2/64")
    try:
        yield Uplink(name, f"{v4}31", f"{v6}31", {
            "ip": f"{v4}31/24", "gw": f"{v4}2", "ip6": f"{v6}31/64", "gw6": f"{v6}2"})
    finally:
        hv.net.del_link(name)


@pytest.fixture(scope="module")
def link(hv: Libvirtd) -> Iterator[Uplink]:
    with uplink(hv, 4) as u:
        yield u


@pytest.fixture(scope="module")
def mvm(hv: Libvirtd, agent: AgentProc, link: Uplink) -> Iterator[Domain]:
    """The macvtap domain (bridge mode) on the uplink, started, its guest up
    (its MAC from the domain XML; 198.18.4.31 and fdac:29:4::31, the sink
    its gateway)."""
    vm = hv.define("mv", guest.build(), guest.cmdline(**link.net, timeout=1), bridges=(),
                   direct=(link.lower,))
    try:
        vm.start()
        vm.wait_console("SGREADY", timeout=90)
        yield vm
    finally:
        vm.undefine()


def report(request: pytest.FixtureRequest, what: str, **figures: Any) -> None:
    for k, v in figures.items():
        request.node.user_properties.append((k, v))
    print(f"\n[{request.node.name}] {what}: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


def counts(agent: AgentProc, vm: str, port: int) -> dict[str, float]:
    """The agent's figures for one VM and port: attempts, completed
    handshakes, blocked attempts."""
    p = str(port)
    return {"attempts": agent.counter(ATTEMPTS, vm=vm, port=p),
            "completed": agent.counter(HANDSHAKES, vm=vm, port=p, outcome="completed"),
            "blocked": agent.counter(BLOCKED, vm=vm, port=p)}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def wait_counts(agent: AgentProc, vm: str, port: int, before: dict[str, float],
                **least: float) -> dict[str, float]:
    """The VM's delta since `before` once each figure named is at least
    that (or, after 10 s, whatever it is, for the assertion to show)."""
    deadline = time.monotonic() + 10
    while True:
        got = delta(counts(agent, vm, port), before)
        if all(got[k] >= v for k, v in least.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def sink_seen(hv: Libvirtd, link: Uplink, port: int, kind: str = "connections") -> int:
    """Handshakes (or sessions) the sink accepted from the guest on link,
    both families."""
    return sum(hv.net.sink.count(kind, port=port, peer=a) for a in (link.addr4, link.addr6))


def sends(hv: Libvirtd, port: int, n: int) -> list[guest.Send]:
    """n attempts to port: n - 1 over IPv4, one over IPv6."""
    return [guest.Send(hv.net.dest(0), port, n - 1), guest.Send(hv.net.dest(0, 6), port, 1)]


# -- macvtap ------------------------------------------------------------------

def test_a_macvtap_domain_is_counted_exactly_under_its_domain_uuid(
        hv: Libvirtd, agent: AgentProc, mvm: Domain, link: Uplink,
        request: pytest.FixtureRequest) -> None:
    """A domain on a macvtap (bridge mode) is a VM like a bridged one: N
    connections from its own kernel to an allowed port (587, under the
    default ceiling) all complete and are N attempts, N completed handshakes,
    under the domain's UUID and name (status row, metrics), with the
    interface libvirt gave it and attachment "macvtap"; nothing is keyed by
    the macvtap's name."""
    uuid, devs = mvm.uuid.lower(), mvm.vnets()
    assert len(devs) == 1 and devs[0].startswith("macvtap"), devs
    before, seen = counts(agent, uuid, 587), sink_seen(hv, link, 587, "sessions")
    row0 = rows(agent).get(uuid, {})
    got = mvm.request(sends(hv, 587, N))
    passed = sink_seen(hv, link, 587, "sessions") - seen
    figures = delta(counts(agent, uuid, 587), before)
    report(request, f"{N} connections to 587 on {devs[0]}",
           guest_ok=sum(r.ok for r in got), sink_sessions=passed, **figures)
    assert [r.ok for r in got] == [N - 1, 1], got
    assert passed == N
    row = wait_row(agent, uuid, lambda r: r["interfaces"] == devs,
                   f"a row on {devs}: the macvtap is not covered")
    assert (row["name"], row["uuid"], row["source"], row["state"]) == (
        mvm.name, uuid, "libvirt", "ok")
    assert (row.get("attachment"), row.get("coverage")) == ("macvtap", "full"), row
    assert wait_counts(agent, uuid, 587, before, attempts=N, completed=N) == {
        "attempts": N, "completed": N, "blocked": 0}
    wait_row(agent, uuid, lambda r: r["attempts_1h"] - row0.get("attempts_1h", 0) == N,
             f"{N} more attempts_1h")
    info = {dict(k)["vm"]: dict(k) for k, v in agent.metrics().get(INFO, {}).items() if v}
    assert info[uuid]["name"] == mvm.name
    assert not [vm for vm in rows(agent) if vm.startswith(("macvtap", "sgmv"))]
    assert not [vm for vm in info if vm.startswith(("macvtap", "sgmv"))]


def test_port_25_from_a_macvtap_domain_is_refused_by_the_default_policy(
        hv: Libvirtd, agent: AgentProc, mvm: Domain, link: Uplink,
        request: pytest.FixtureRequest) -> None:
    """The default policy blocks port 25 on a macvtap as on a bridge port:
    none of N port-25 connections (IPv4 and IPv6) completes or even reaches
    the sink; they are dropped on the macvtap's transmit path (netdev egress
    cannot reset, so the guest times out), and each is counted as on a
    bridge port: an attempt and a blocked attempt under the domain, once
    (the guest's SYN retransmissions are not counted again)."""
    uuid = mvm.uuid.lower()
    before, seen = counts(agent, uuid, 25), sink_seen(hv, link, 25)
    row0 = rows(agent).get(uuid, {})
    got = mvm.request(sends(hv, 25, N))
    passed = sink_seen(hv, link, 25) - seen
    figures = wait_counts(agent, uuid, 25, before, attempts=N, blocked=N)
    row = rows(agent).get(uuid, {})
    report(request, f"{N} connections to 25 on {mvm.vnets()}",
           guest_ok=sum(r.ok for r in got), guest_timeout=sum(r.timeout for r in got),
           guest_refused=sum(r.refused for r in got), sink_handshakes=passed,
           status_blocked_1h=row.get("blocked_1h", 0) - row0.get("blocked_1h", 0),
           status_attempts_1h=row.get("attempts_1h", 0) - row0.get("attempts_1h", 0),
           **figures)
    assert [r.ok for r in got] == [0, 0] and passed == 0, (
        f"port 25 went through the macvtap: guest {got}, sink accepted {passed}")
    assert [r.timeout for r in got] == [N - 1, 1], f"dropped, not reset: {got}"
    assert figures == {"attempts": N, "completed": 0, "blocked": N}, figures
    wait_row(agent, uuid, lambda r: (r["attempts_1h"] - row0.get("attempts_1h", 0),
                                     r["blocked_1h"] - row0.get("blocked_1h", 0)) == (N, N),
             f"{N} more attempts_1h and blocked_1h")


def test_a_block_by_domain_name_stops_the_macvtaps_next_syn(
        hv: Libvirtd, agent: AgentProc, mvm: Domain, link: Uplink,
        request: pytest.FixtureRequest) -> None:
    """`smtpguard block <domain name>` on a macvtap domain: status says
    blocked at once, and from the next SYN none of N connections to 587
    completes or reaches the sink; each is an attempt and a blocked attempt
    under the domain's UUID."""
    uuid, devs = mvm.uuid.lower(), mvm.vnets()
    agent.ctl("block", mvm.name, "--for", "1h", "--reason", "macvtap test")
    wait_row(agent, uuid, lambda r: r["state"] == "blocked", "state blocked", timeout=5)
    before, seen = counts(agent, uuid, 587), sink_seen(hv, link, 587)
    got = mvm.request(sends(hv, 587, N))
    passed = sink_seen(hv, link, 587) - seen
    figures = wait_counts(agent, uuid, 587, before, attempts=N, blocked=N)
    report(request, f"blocked, {N} connections to 587 on {devs}",
           guest_ok=sum(r.ok for r in got), sink_handshakes=passed, **figures)
    assert [r.ok for r in got] == [0, 0] and passed == 0, (
        f"the blocked macvtap domain still mails: guest {got}, sink accepted {passed}")
    assert figures == {"attempts": N, "completed": 0, "blocked": N}, figures
    row = rows(agent)[uuid]
    assert (row["state"], row["interfaces"]) == ("blocked", devs)


def test_a_classifier_removed_from_the_macvtap_is_put_back_and_the_block_holds(
        hv: Libvirtd, agent: AgentProc, mvm: Domain, link: Uplink,
        request: pytest.FixtureRequest) -> None:
    """On a macvtap the netdev table marks what it refuses and the classifier
    drops it, so the classifier is enforcement there: one deleted behind the
    agent's back (`tc qdisc del ... clsact`) is put back within the 10 s
    check (`iface.repaired`), and the blocked domain's next SYNs are stopped
    again."""
    import subprocess

    uuid, (dev,) = mvm.uuid.lower(), mvm.vnets()
    agent.ctl("block", mvm.name, "--for", "1h", "--reason", "macvtap test")
    wait_row(agent, uuid, lambda r: r["state"] == "blocked", "state blocked", timeout=5)
    since = time.time()
    subprocess.run(["ip", "netns", "exec", hv.netns, "tc", "qdisc", "del", "dev", dev,
                    "clsact"], check=True)
    (ev,) = agentkit.wait_events(agent, "iface.repaired", since, timeout=15, interface=dev)
    seen = sink_seen(hv, link, 587)
    got = mvm.request(sends(hv, 587, N))
    passed = sink_seen(hv, link, 587) - seen
    report(request, f"classifier removed from {dev}, put back", guest_ok=sum(
        r.ok for r in got), sink_handshakes=passed, repaired_after=agentkit.ts(ev) - since)
    assert [r.ok for r in got] == [0, 0] and passed == 0, (
        f"the blocked macvtap domain mails once its filter went: {got}, sink {passed}")


def test_a_blocked_macvtap_domain_stays_blocked_from_its_first_syn_across_destroy_start(
        hv: Libvirtd, agent: AgentProc, mvm: Domain, link: Uplink,
        request: pytest.FixtureRequest) -> None:
    """A blocked macvtap domain destroyed and started again (libvirt makes a
    new macvtap, maybe under another name) keeps its block: the agent puts it
    on the new device (its table's chain and the classifier) before the
    guest's first SYN, none of N connections
    completes or reaches the sink, and status shows the same block (until,
    reason) on the new device, under the domain's UUID only."""
    uuid = mvm.uuid.lower()
    if rows(agent).get(uuid, {}).get("state") != "blocked":  # run on its own
        agent.ctl("block", mvm.name, "--for", "1h", "--reason", "macvtap test")
    blocked = wait_row(agent, uuid, lambda r: r["state"] == "blocked", "state blocked")
    old = mvm.vnets()
    mvm.destroy()
    wait_row(agent, uuid, lambda r: r["interfaces"] == [], "no interface once destroyed")
    t0 = time.time()
    mvm.start()
    devs = mvm.vnets()
    mvm.wait_console("SGREADY", timeout=90)
    booted = time.time()
    before, seen = counts(agent, uuid, 587), sink_seen(hv, link, 587)
    sent = time.time()
    got = mvm.request(sends(hv, 587, N))  # this boot's first SYNs
    passed = sink_seen(hv, link, 587) - seen
    figures = wait_counts(agent, uuid, 587, before, attempts=N, blocked=N)
    followed = events_since(agent, "enforce.followed", t0, vm=uuid)
    report(request, f"{old} -> destroy, start -> {devs}",
           boot_s=booted - t0, guest_ok=sum(r.ok for r in got), sink_handshakes=passed,
           enforced_after_start_s=(ts(followed[0]) - t0) if followed else -1.0, **figures)
    assert [r.ok for r in got] == [0, 0] and passed == 0, (
        f"the block did not follow the domain to {devs}: guest {got}, sink accepted {passed}")
    assert figures == {"attempts": N, "completed": 0, "blocked": N}, figures
    [ev] = wait_events(agent, "enforce.followed", t0, vm=uuid)
    assert ev["interface"] == devs[0] and ev["action"] == "block", ev
    assert ts(ev) < sent, "the block reached the new macvtap after the guest's first SYN"
    # On a macvtap the table marks a refused SYN and the classifier (tc egress,
    # after netfilter's egress hook) counts and drops it: both were there.
    attached = events_since(agent, "iface.attached", t0, interface=devs[0], vm=uuid)
    assert attached and ts(attached[0]) < sent, attached
    row = wait_row(agent, uuid, lambda r: r["interfaces"] == devs, f"on {devs}")
    assert (row["state"], row["until"], row["reason"], row.get("attachment"),
            row.get("coverage")) == ("blocked", blocked["until"], blocked["reason"],
                                     "macvtap", "full")
    # The new macvtap is named from libvirt: nothing is left under its name.
    assert not [vm for vm in rows(agent) if vm.startswith(("macvtap", "sgmv"))]
    assert not [dict(k)["vm"] for k in agent.metrics().get(INFO, {})
                if dict(k)["vm"].startswith(("macvtap", "sgmv"))]


def test_a_macvtap_in_passthrough_mode_is_covered_like_one_in_bridge_mode(
        hv: Libvirtd, agent: AgentProc, request: pytest.FixtureRequest) -> None:
    """`<source dev=LOWER mode='passthrough'/>` gives the guest the whole lower
    device, but through a macvtap in the host kernel: defined, the domain is
    not reported uncovered; running, it is a VM on its macvtap (attachment
    macvtap, coverage full) whose connections to 587 are counted and
    complete, and whose port-25 connection is refused and counted, under its
    UUID."""
    with uplink(hv, 5) as up:
        nic = (f"<interface type='direct'><mac address='52:54:00:5a:01:01'/><source "
               f"dev='{up.lower}' mode='passthrough'/><model type='virtio'/></interface>")
        line = guest.cmdline(**up.net, timeout=1)
        vm = hv.define("pt", guest.build(), line, bridges=(), devices=nic)
        try:
            uuid = vm.uuid.lower()
            time.sleep(1.5)  # a housekeeping tick: an uncovered VM would be listed by now
            assert uuid not in rows(agent), rows(agent)[uuid]
            assert not events_since(agent, "vm.uncovered", 0, vm=uuid)
            vm.start()
            devs = vm.vnets()
            vm.wait_console("SGREADY", timeout=90)
            peer = up.addr4
            b587, b25 = counts(agent, uuid, 587), counts(agent, uuid, 25)
            got = vm.request([guest.Send(hv.net.dest(0), 587, 2),
                              guest.Send(hv.net.dest(0), 25, 1)])
            f587 = wait_counts(agent, uuid, 587, b587, attempts=2, completed=2)
            f25 = wait_counts(agent, uuid, 25, b25, attempts=1, blocked=1)
            report(request, f"passthrough on {devs}", guest_ok=[r.ok for r in got],
                   sink_587=hv.net.sink.count(port=587, peer=peer),
                   sink_25=hv.net.sink.count("connections", port=25, peer=peer),
                   **{f"p587_{k}": v for k, v in f587.items()},
                   **{f"p25_{k}": v for k, v in f25.items()})
            assert [(r.port, r.ok) for r in got] == [(587, 2), (25, 0)], got
            assert hv.net.sink.count(port=587, peer=peer) == 2
            assert hv.net.sink.count("connections", port=25, peer=peer) == 0
            assert f587 == {"attempts": 2, "completed": 2, "blocked": 0}, f587
            assert f25 == {"attempts": 1, "completed": 0, "blocked": 1}, f25
            row = rows(agent)[uuid]
            assert (row["name"], row["interfaces"], row["attachment"], row["coverage"]) == (
                vm.name, devs, "macvtap", "full"), row
        finally:
            vm.undefine()


# -- uncovered ----------------------------------------------------------------

UNCOVERED_NICS = {
    # reason -> a NIC libvirt defines without the thing behind it existing
    "vhost-user": "<interface type='vhostuser'><mac address='{mac}'/>"
                  "<source type='unix' path='/tmp/{name}.sock' mode='client'/>"
                  "<model type='virtio'/></interface>",
    "hostdev": "<interface type='hostdev' managed='yes'><mac address='{mac}'/><source>"
               "<address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x7'/>"
               "</source></interface>",
}


def test_domains_whose_traffic_bypasses_the_host_kernel_are_reported_uncovered(
        hv: Libvirtd, agent: AgentProc, request: pytest.FixtureRequest) -> None:
    """A domain with a vhost-user NIC and one with a hostdev NIC (an SR-IOV
    VF), defined and never started, are not silently skipped: each is a row
    of `status --json` under its UUID with coverage "none (<reason>)",
    smtpguard_vms_uncovered{reason} counts them (vhost-user: 1, hostdev: 1),
    and the log says vm.uncovered for each, with its name and reason.
    Undefined, they are reported no more."""
    t0 = time.time()
    doms: dict[str, Domain] = {}
    ids: dict[str, str] = {}
    try:
        for i, (reason, nic) in enumerate(UNCOVERED_NICS.items()):
            name = f"{hv.prefix}-u{i}"
            xml = nic.format(mac=f"52:54:00:5a:00:{i:02x}", name=name)
            doms[reason] = hv.define(f"u{i}", guest.build(), guest.cmdline(), bridges=(),
                                     devices=xml)
            ids[reason] = doms[reason].uuid.lower()
        assert not [d for d in doms.values() if d.is_active()]
        deadline = time.monotonic() + 15
        while True:
            got = rows(agent)
            if all(u in got for u in ids.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        coverage = {reason: got.get(u, {}).get("coverage") for reason, u in ids.items()}
        metric = {dict(k).get("reason"): v
                  for k, v in agent.metrics().get(UNCOVERED, {}).items()}
        # Status and metrics ask the inventory when read; the log says it
        # at the agent's next housekeeping tick.
        for u in ids.values():
            with contextlib.suppress(AssertionError):
                wait_events(agent, "vm.uncovered", t0, timeout=5, vm=u)
        logged = {e.get("vm"): e for e in events_since(agent, "vm.uncovered", t0)}
        report(request, "uncovered domains", coverage=coverage, metric=metric,
               logged={r: ids[r] in logged for r in ids})
        for reason, u in ids.items():
            assert u in got, f"the {reason} domain {doms[reason].name} is not in status: {got}"
            row = got[u]
            assert (row["name"], row["interfaces"]) == (doms[reason].name, []), row
        assert coverage == {r: f"none ({r})" for r in ids}
        assert {r: metric.get(r) for r in ids} == {r: 1 for r in ids}, metric
        assert sum(metric.values()) == len(ids), metric
        for reason, u in ids.items():
            assert u in logged, f"no vm.uncovered for the {reason} domain:\n" + \
                agent.log_path.read_text()[-3000:]
            ev = logged[u]
            assert (ev.get("name"), ev.get("reason")) == (doms[reason].name, reason), ev
    finally:
        for d in doms.values():
            d.undefine()
    gone = time.monotonic() + 15
    while (set(rows(agent)) & set(ids.values())) and time.monotonic() < gone:
        time.sleep(0.2)
    assert not set(rows(agent)) & set(ids.values()), "undefined domains still in status"
    assert sum(agent.metrics().get(UNCOVERED, {}).values()) == 0
