"""Reaction time: from the SYN that crosses a threshold to the rule in the
kernel that stops the VM's next attempt, over TRIALS trials (one fresh lab
VM each, so no trial inherits another's state).

Each trial, inside the VM: ATTEMPTS - 1 connections that complete, a short
pause, then the crossing connection (its SYN leaves at t0), then probes, one
connection attempt every PROBE_GAP, until one is refused or unanswered: the
stop time is when that probe's SYN left. Resolution: the probe gap plus one
probe's handshake (well under a millisecond in the lab). With the trip wire
the first probe is always the one stopped (one that gets through is said on
stderr), so this is the crossing connection's own round trip.

The reference column is what the usual scripts achieve: a job that re-reads
counters and re-applies rules every 60 s, or one that scrapes mail logs every
20 minutes, reacts when its next run comes; with the crossing at a random
phase its delay is uniform over the period (p50 = P/2, p99 = 0.99 P). That is
a model, stated as such, not a measurement.

Raised: attempts past the threshold at RATE new connections a second. Each
of FLOOD_TRIALS fresh routed VMs fires FLOOD SYNs (non-blocking connects to
distinct destinations) at RATE a second against a threshold of ATTEMPTS;
whatever the sink answered beyond the ATTEMPTS-th (the crossing attempt
passes by definition) got through: the VM's completed handshakes minus
ATTEMPTS. Measured with the trip wire (datapath/trip.py: the classifier
marks every SYN after the crossing one, a rule already in the tables rejects
it) and, beside it in the same run, without (datapath.trip_mark: 0: the
agent's own reaction, doorbell and nftables element, as before).
"""

from __future__ import annotations

import socket
import sys
import time

from labagent import Agent, lab_agent
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology
from smtpguard.lab.traffic import fan_out
from table import Row, pct

TRIALS = 100
ATTEMPTS = 10  # the threshold: this many attempts in a minute blocks
PROBE_GAP = 0.001
PORT = 587
POLICY = f"""version: 1
classes:
  default:
    limit: {{rate: 60000/minute, burst: 5000}}
    thresholds:
      - {{name: burst, metric: attempts, window: 1m, at_least: {ATTEMPTS}, action: block,
         duration: 1h}}
"""
SECTION = "5 reaction time"
RATE = 8000  # new SMTP connections a second: what a cloud VM can open
FLOOD = 2000
FLOOD_TRIALS = 10


def _connect(addr: str, timeout: float) -> bool:
    """One attempt; True when it was let through."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((addr, PORT))
        return True
    except (ConnectionRefusedError, TimeoutError, OSError):
        return False
    finally:
        s.close()


def trial(ns: str, dest: str) -> float:
    """Seconds from the crossing SYN to the first attempt stopped."""

    def run() -> float:
        for _ in range(ATTEMPTS - 1):
            if not _connect(dest, 2):
                raise RuntimeError(f"{ns}: attempt stopped before the threshold")
        time.sleep(0.2)  # the agent has seen these; the next one crosses
        t0 = time.monotonic()
        _connect(dest, 2)
        deadline = t0 + 10
        probes = 0
        while time.monotonic() < deadline:
            sent = time.monotonic()
            if not _connect(dest, 0.5):
                if probes:
                    print(f"bench: {ns}: {probes} probe(s) got through", file=sys.stderr)
                return sent - t0
            probes += 1
            time.sleep(PROBE_GAP)
        raise RuntimeError(f"{ns}: not stopped within 10 s")

    return run_in(ns, run)


def flood(lab: topology.Lab, agent: Agent, trials: int) -> tuple[list[float], list[float]]:
    """(attempts past the threshold, the rate each VM reached) per trial."""
    passed, rates = [], []
    for n in range(1, trials + 1):
        vm = f"rvm{n}"
        # Its neighbours resolved again right before its flood, else its first
        # SYNs wait in the ARP queue, overflow it, and come back as
        # retransmissions a second later, after the block.
        topology.warm(lab, vm)
        times = fan_out(lab.vm_ns(vm), FLOOD, RATE, port=PORT, first=10_000 * n)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
        deadline = time.monotonic() + 10
        while agent.counter("smtpguard_smtp_connection_attempts_total", vm=vm) < FLOOD:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{vm}: not every attempt was counted")
            time.sleep(0.1)
        done = agent.counter("smtpguard_smtp_handshakes_total", vm=vm, outcome="completed")
        passed.append(done - ATTEMPTS)
    return passed, rates


def run(trials: int = TRIALS) -> list[Row]:
    delays: list[float] = []
    with lab_agent(POLICY, routed=trials, enforce=True) as (lab, _agent):
        time.sleep(1.5)  # every VM has its zero sample
        for n in range(1, trials + 1):
            delays.append(trial(lab.vm_ns(f"rvm{n}"), topology.dest_addr(n)) * 1000)
    past: dict[str, tuple[list[float], list[float]]] = {}
    for name, policy in (("wire", POLICY), ("agent", POLICY + "datapath: {trip_mark: 0}\n")):
        with lab_agent(policy, routed=FLOOD_TRIALS, enforce=True) as (lab, agent):
            time.sleep(1.5)
            past[name] = flood(lab, agent, FLOOD_TRIALS)
    (wire, wire_rate), (slow, slow_rate) = past["wire"], past["agent"]
    p50, p99 = pct(delays, 50), pct(delays, 99)
    ref = "60 s loop: {} / 20 min log scrape: {}"
    return [
        Row(SECTION, f"threshold crossed -> next attempt stopped, p50 of {trials}", p50, "ms",
            ref.format("30 s", "10 min"), ""),
        Row(SECTION, f"threshold crossed -> next attempt stopped, p99 of {trials}", p99, "ms",
            ref.format("59.4 s", "19.8 min"), "< 100 ms", p99 < 100,
            note=f"max {max(delays):.1f} ms; one routed lab VM per trial, {trials} VMs on the "
                 f"host; reference column is the uniform-phase model of a periodic job"),
        Row(SECTION, f"attempts past a crossed threshold at {RATE:,}/s, max of "
                     f"{FLOOD_TRIALS}", max(wire), "attempts",
            f"without the trip wire: p50 {pct(slow, 50):.0f}, max {max(slow):.0f}", "<= 1",
            max(wire) <= 1,
            note=f"{FLOOD:,} SYNs a VM to distinct destinations, threshold {ATTEMPTS}; "
                 f"rates reached {min(wire_rate):,.0f}-{max(wire_rate):,.0f}/s "
                 f"({min(slow_rate):,.0f}-{max(slow_rate):,.0f}/s without); past = completed "
                 f"handshakes - {ATTEMPTS}; with the wire p50 {pct(wire, 50):.0f}"),
    ]


if __name__ == "__main__":
    for r in run(int(sys.argv[1]) if len(sys.argv) > 1 else TRIALS):
        print(r)
