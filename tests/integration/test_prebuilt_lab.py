"""A first start after boot (nothing pinned) loads the build stored in the
state dir instead of compiling; real traffic is counted exactly as by a
compiled classifier, and a build that does not fit is compiled afresh."""

from __future__ import annotations

from conftest import AgentProc, send
from smtpguard.lab import topology

ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
HANDSHAKES = "smtpguard_smtp_handshakes_total"
Pair = tuple[topology.Lab, AgentProc]


def traffic(lab: topology.Lab, agent: AgentProc) -> dict[tuple[tuple[str, str], ...], float]:
    """The same connections from vm1 (completed on 25 and 587, v4 and v6,
    refused on 2525) and the attempt and handshake series they leave."""
    assert send(lab, "vm1", 6, destinations=3) == {"completed": 6}
    assert send(lab, "vm1", 2, port=587, ipv6=True) == {"completed": 2}
    assert send(lab, "vm1", 3, port=2525) == {"refused": 3}
    m = agent.metrics()
    out = {(("metric", name), *k): v for name in (ATTEMPTS, HANDSHAKES)
           for k, v in m.get(name, {}).items() if ("vm", "vm1") in k}
    assert sum(v for k, v in out.items() if ("metric", ATTEMPTS) in k) == 11
    return out


def reboot(agent: AgentProc) -> None:
    """What a reboot leaves of the agent: its state dir (no filters, no pins)."""
    agent.stop()
    agent.cleanup()


def test_first_start_after_boot_loads_the_stored_build_and_counts_alike(
        own_lab: Pair) -> None:
    """With nothing pinned and a stored build of this kernel, the agent loads
    it without compiling, and the same traffic gives the same counters."""
    lab, agent = own_lab
    assert agent.wait_event("bpf.loaded")["source"] == "compiled"
    agent.wait_event("bpf.cache_stored")
    compiled = traffic(lab, agent)

    reboot(agent)
    agent.start()
    ev = agent.wait_event("bpf.loaded")
    assert (ev["source"], ev["compiled"]) == ("cache", False)
    assert agent.wait_event("iface.attached", vm="vm1")
    assert traffic(lab, agent) == compiled


def test_corrupt_stored_build_is_compiled_afresh(own_lab: Pair) -> None:
    """A damaged stored build is not loaded: the agent says why, compiles,
    counts, and stores a good one for the next boot."""
    lab, agent = own_lab
    agent.wait_event("bpf.cache_stored")
    (path,) = (agent.state_dir / "bpf-cache").glob("classifier-*.json")
    reboot(agent)
    path.write_bytes(path.read_bytes()[:-100])

    agent.start()
    miss = agent.wait_event("bpf.cache_miss")
    assert "unreadable" in miss["reason"]
    assert agent.wait_event("bpf.loaded")["source"] == "compiled"
    agent.wait_event("bpf.cache_stored")
    traffic(lab, agent)

    reboot(agent)
    agent.start()
    assert agent.wait_event("bpf.loaded")["source"] == "cache"
