"""One VM offering SMTP SYNs as fast as this machine makes them (a raw
socket, every SYN a new attempt), while another VM sends mail: every attempt
is counted exactly, the ceiling holds, the other VM's mail flows, and the
agent's loop keeps running (its heartbeat never goes stale)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import frames as f
from kit import lab_with_agent, require_root, scale, send
from smtpguard.lab import topology
from smtpguard.netns import run_in

SYNS = scale(300_000, 40_000)
ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
BLOCKED = "smtpguard_smtp_blocked_attempts_total"
POLICY = """
version: 1
classes:
  default:
    port25: block
    limit: {rate: 600/minute, burst: 20}
    limited_ports: [465, 587, 2525]
    thresholds: []
"""


def mac(ns: str, ifname: str) -> bytes:
    def run() -> bytes:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))

    return run_in(ns, run)


def with_checksum(ip: bytes) -> bytes:
    """The IPv4 header checksum, which the IP layer checks (tc does not)."""
    hdr = bytearray(ip[:20])
    total = sum(struct.unpack("!10H", bytes(hdr)))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", hdr, 10, ~total & 0xFFFF)
    return bytes(hdr) + ip[20:]


def dropped() -> int:
    """Packets the kernel dropped from its input backlogs (all CPUs)."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat")
               .read_text().splitlines())


def flood(lab: topology.Lab, vm: str, n: int, port: int) -> tuple[int, float]:
    """n SYNs with distinct (port, ISN), raw from the VM's eth0 to its gateway,
    so the firewall sees them as the VM's own: (sent, seconds)."""
    vm_mac, gw_mac = mac(lab.vm_ns(vm), "eth0"), mac(lab.hv, f"veth-{vm}")

    def run() -> tuple[int, float]:
        src = lab.routed_addr(1)
        frames = [f.eth(with_checksum(f.ipv4(src, topology.dest_addr(i % 200), f.tcp(
            10000 + i % 50000, port, f.SYN, seq=i))), f.ETH_P_IP, src=vm_mac, dst=gw_mac)
            for i in range(n)]
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("eth0", 0))
            t0 = time.monotonic()
            sent = sum(1 for fr in frames if s.send(fr))
            return sent, time.monotonic() - t0

    return run_in(lab.vm_ns(vm), run)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_syn_flood_is_counted_exactly_and_limited_while_others_mail(tmp_path: Path,
                                                                    backend: str) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True,
                        backend=backend) as (lab, agent):
        before = agent.counter(ATTEMPTS, vm="rvm1", port="587")
        other: dict[str, Any] = {}
        mailer = threading.Thread(target=lambda: other.update(
            r=send(lab, "vm1", 5, port=587, dialog="mail", rate=2)))
        mailer.start()
        lost = dropped()
        sent, seconds = flood(lab, "rvm1", SYNS, 587)
        mailer.join()
        time.sleep(1)
        lost = dropped() - lost  # before the classifier (input backlog full)
        counted = agent.counter(ATTEMPTS, vm="rvm1", port="587") - before
        rejected = agent.counter(BLOCKED, vm="rvm1", port="587", reason="limit")
        # nftables: rejected beyond its dedup memory are counted as overflow (defined).
        rejected += agent.counter("smtpguard_nft_overflow_total")
        accepted = counted - rejected
        allowed = 20 + (seconds + 1) * 10  # burst + 600/minute over the flood
        m = agent.metrics()
        stale = time.time() - m["smtpguard_last_loop_timestamp_seconds"][()]
        loops = m["smtpguard_loop_duration_seconds_count"][()]
        slow = loops - m["smtpguard_loop_duration_seconds_bucket"][(("le", "0.25"),)]
        print(f"\nload ({backend}): offered {sent} SYNs in {seconds:.2f}s "
              f"({sent / seconds:,.0f}/s), dropped by the kernel before tc {lost}, "
              f"counted {counted:.0f}, accepted {accepted:.0f} "
              f"(ceiling allows {allowed:.0f}), other VM {other['r']}, detection loops "
              f"{loops:.0f}, slower than 0.25 s: {slow:.0f}")
        assert sent - lost <= counted <= sent  # every attempt that arrived, none twice
        assert accepted <= allowed
        assert other["r"] == {"completed": 5}
        assert stale < 10  # the loop still runs: the watchdog stays fed
