"""VMs on Open vSwitch, as OpenStack ML2/OVS, OVN and libvirt's
<virtualport type='openvswitch'> plug them: the OVS kernel datapath switches a
port's frames in its rx_handler, so neither the bridge- nor the inet-family
prerouting hook sees them; only tc ingress (the classifier) and a netdev
ingress hook on the port do. Here the agent runs as installed (`make install`,
systemd) in the system tier's Debian 12 machine: Debian's kernel 6.1 (which
has openvswitch.ko, unlike these hosts' own) and Debian's openvswitch-switch.

Resets, per attachment, on this kernel (test_resets_where_the_kernel_has_a_reject_module
checks and records it): a Linux bridge port is judged in the bridge family,
whose reject is nft_reject_bridge (present: a TCP reset, "refused"); a routed
tap in the inet family, nft_reject_inet (present); an OVS port at netdev
ingress, whose reject is nft_reject_netdev (in these hosts' 6.18), which
Debian 12's 6.1 leaves out (# CONFIG_NFT_REJECT_NETDEV is not set): there the
agent drops, so a refused attempt on OVS reads "no answer" (timed out), never
"completed". A macvtap is judged at netdev egress, where no kernel can
reject: dropped everywhere.

One machine for the module (the ovs_host fixture installs the agent and
builds the lab in it with ovslab.py); each test has VMs of its own, so the
tests hold in any order (`-p randomly` shuffles them):
    ovs1, ovs2   OVS ports with an ifalias, plugged before the agent starts
    ovs3         an OVS port plugged later, in a class with a tight ceiling
    ovs4         starts on a Linux bridge (patched to OVS), moved to OVS
    ovs5, br6    an OVS port and a Linux bridge port, for the reset comparison
    tap...       OVS ports with no ifalias, named by their Interface's external_ids
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from machine import Machine, note, timing

pytestmark = pytest.mark.timeout(1800)

SG = "/opt/smtpguard/venv/bin/smtpguard"
PY = "/opt/smtpguard/venv/bin/python"
LAB = f"{PY} /root/smtpguard/tests/system/ovslab.py"
POLICY = "/etc/smtpguard/policy.yaml"
N = 3  # connections a send opens: small, TCG is slow
TIGHT = {"rate": "3/minute", "burst": 1}  # ovs3's class's ceiling on 587
TIGHT_MAX = 3 + 1  # what a full bucket lets through at once: at most rate + burst

# An OpenStack port (os-vif names the tap after the port's id and sets the
# instance's UUID as vm-uuid) and one that says only its iface-id (OVN).
VM_UUID = "5CA1AB1E-0D15-4EA5-9C0F-0000000000A5"  # upper case: the id is lowercased
IFACE_A = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"
IFACE_B = "7e8d9c0b-1a2b-4c3d-8e4f-5a6b7c8d9e0f"
TAP_A, TAP_B = f"tap{IFACE_A[:11]}", f"tap{IFACE_B[:11]}"
MAC_A, MAC_B = "fa:16:3e:00:00:a5", "fa:16:3e:00:00:b6"  # the guests'; their taps' are fe:...

# Printed with the journal when a test fails (conftest's diagnostics).
DIAGNOSTICS = ("ovs-vsctl show; ip -br link; nft list tables; "
               "nft list table netdev smtpguard 2>&1 | head -80; "
               "tc filter show dev veth-sgovs1 ingress")


# -- helpers --------------------------------------------------------------
def send(m: Machine, vm: str, n: int, port: int, timeout: float = 5.0) -> dict[str, int]:
    r = m.sh(f"{LAB} send {vm} --connections {n} --port {port} --timeout {timeout}")
    result: dict[str, int] = json.loads(r.out.splitlines()[-1])
    return result


def never_completed(got: dict[str, int], n: int) -> bool:
    """Refused by a reset or dropped (timed out): the SYN never got through.
    `failed` would be a connection that opened and then broke: it got through."""
    return sum(got.values()) == n and set(got) <= {"refused", "no_answer"}


def rows(m: Machine) -> dict[str, dict[str, Any]]:
    return {r["vm"]: r for r in json.loads(m.sh(f"{SG} status --json").out)}


def wait(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {got!r})")
        time.sleep(every)


def listed(m: Machine, vm: str, ifname: str, attachment: str,
           timeout: float = 60) -> dict[str, Any]:
    """Wait until status lists the VM on that interface, on that attachment.
    An agent that reports no attachment at all (before OVS was enforced) is
    taken at its word here; the tests assert the field after the traffic."""
    def check() -> dict[str, Any] | None:
        r = rows(m).get(vm)
        if r and ifname in r["interfaces"] and r.get("attachment", attachment) == attachment:
            return r
        return None

    found: dict[str, Any] = wait(f"{vm} listed on {ifname} ({attachment})", check, timeout)
    return found


def counted(m: Machine, vm: str, field: str, n: int, timeout: float = 60) -> dict[str, Any]:
    """Wait until the VM's status row has field >= n (the detection loop's pace)."""
    found: dict[str, Any] = wait(f"{vm}'s {field} >= {n}",
                                 lambda: (r := rows(m).get(vm)) and r[field] >= n and r, timeout)
    return found


_SCRAPE = ("import json, urllib.request\n"
           "from prometheus_client.parser import text_string_to_metric_families as parse\n"
           "text = urllib.request.urlopen('http://127.0.0.1:9725/metrics', timeout=20)"
           ".read().decode()\n"
           "print(json.dumps([[s.name, s.labels, s.value] for f in parse(text) "
           "for s in f.samples]))\n")


def metric(m: Machine, name: str, **labels: str) -> float:
    """The sum of a metric's samples with those labels, scraped in the machine."""
    samples = json.loads(m.run([PY, "-c", _SCRAPE], timeout=60).check("scrape").out)
    return float(sum(v for n, lab, v in samples
                     if n == name and all(lab.get(k) == want for k, want in labels.items())))


def edit_policy(m: Machine, code: str) -> None:
    script = (f"import yaml; p = yaml.safe_load(open('{POLICY}')); {code}; "
              f"yaml.safe_dump(p, open('{POLICY}.new', 'w'), sort_keys=False)")
    m.sh(f"{PY} -c \"{script}\" && chmod 600 {POLICY}.new && mv {POLICY}.new {POLICY}")


# -- the host ----------------------------------------------------------
@pytest.fixture(scope="module")
def ovs_host(machine: Machine) -> Machine:
    """The operator's path on an OVS host: `make install`, Open vSwitch up
    (its kernel datapath: the openvswitch module, datapath ovs-system), VMs
    on an OVS bridge, `systemctl enable --now smtpguard`, more VMs plugged
    while it runs; each listed by the agent."""
    m = machine
    m.sh("cp -a /mnt/src/smtpguard /root/smtpguard")
    m.write("/etc/pip.conf", "[global]\nno-index = true\nfind-links = /mnt/src/wheels\n")
    r, seconds = m.timed("cd /root/smtpguard && make install 2>&1", timeout=1200)
    timing("make install (in the machine)", seconds)
    assert "installed in /: systemctl enable --now smtpguard" in r.out, r.out
    _r, seconds = m.timed("systemctl start openvswitch-switch && ovs-vsctl --timeout=60 show",
                          timeout=300)
    timing("systemctl start openvswitch-switch", seconds)
    assert "openvswitch " in m.sh("lsmod").out + "\n", "no openvswitch kernel module loaded"
    assert m.sh("ovs-vsctl get Open_vSwitch . ovs_version").out.strip().strip('"') \
        .startswith("3."), "not Debian 12's Open vSwitch"
    # ovs3's class: a tight ceiling on 587, in the policy the agent starts with.
    edit_policy(m, f"p['classes']['tight'] = {{'limit': {TIGHT!r}, "
                   "'throttle': {'rate': '1/minute', 'burst': 1}}; "
                   "p['members'] = [{'class': 'tight', 'vm': 'ovs3'}]")
    m.sh(f"{SG} policy check {POLICY}")
    m.sh(f"{LAB} up && {LAB} vm ovs1 --index 1 --ifalias ovs1 && "
         f"{LAB} vm ovs2 --index 2 --ifalias ovs2")
    assert m.sh("ovs-dpctl show").out.count("veth-sgovs") == 2  # in the kernel datapath
    _r, seconds = m.timed("systemctl enable --now smtpguard", timeout=600)
    timing("systemctl enable --now smtpguard", seconds)
    m.sh(f"{LAB} vm ovs3 --index 3 --ifalias ovs3 && "
         f"{LAB} vm ovs4 --index 4 --ifalias ovs4 --on bridge && "
         f"{LAB} vm ovs5 --index 5 --ifalias ovs5 && "
         f"{LAB} vm br6 --index 6 --ifalias br6 --on bridge")
    for n in (1, 2, 3, 5):
        listed(m, f"ovs{n}", f"veth-sgovs{n}", "ovs")
    listed(m, "ovs4", "veth-sgovs4", "bridge")
    listed(m, "br6", "veth-sgovs6", "bridge")
    return m


# -- the tests ------------------------------------------------------------
def test_status_says_how_each_vm_is_plugged_in(ovs_host: Machine) -> None:
    """Every VM is listed with its attachment, read from the kernel: `ovs`
    for an OVS port (plugged before the agent started or after), `bridge`
    for a Linux bridge port; and covered in full (counted and enforced)."""
    got = {vm: (r.get("attachment"), r.get("coverage", "full"))
           for vm, r in rows(ovs_host).items() if vm in ("ovs1", "ovs2", "ovs3", "ovs5", "br6")}
    assert got == {"ovs1": ("ovs", "full"), "ovs2": ("ovs", "full"), "ovs3": ("ovs", "full"),
                   "ovs5": ("ovs", "full"), "br6": ("bridge", "full")}, got


def test_port25_from_an_ovs_vm_never_completes_and_is_counted(ovs_host: Machine) -> None:
    """Port 25 is blocked for the default class whatever the VM is plugged
    into: from a VM on an OVS port, 0 of N connections complete, each attempt
    is counted for that VM (status and metrics), and status says `ovs`."""
    m = ovs_host
    got = send(m, "ovs1", N, 25)
    assert never_completed(got, N), f"port 25 from a VM on OVS: {got} of {N}"
    r = counted(m, "ovs1", "attempts_1h", N)
    assert r["attempts_1h"] == N, r  # the retransmitted SYNs of a drop are not attempts
    r = counted(m, "ovs1", "blocked_1h", N)
    assert r["blocked_1h"] == N, r
    assert r["attachment"] == "ovs" and r.get("coverage", "full") == "full", r
    assert metric(m, "smtpguard_smtp_connection_attempts_total", vm="ovs1", port="25") == N
    assert metric(m, "smtpguard_smtp_blocked_attempts_total", vm="ovs1", port="25") == N
    assert "table netdev smtpguard" in m.sh("nft list tables").out


def test_block_and_release_on_ovs(ovs_host: Machine) -> None:
    """`smtpguard block VM` stops a VM on OVS from its next SYN (0 of N on
    587, which its class otherwise allows), and `release` lets it through."""
    m = ovs_host
    assert send(m, "ovs2", N, 587) == {"completed": N}  # the path works, within its ceiling
    m.sh(f"{SG} block ovs2 --for 1h --reason 'system test: ovs'")
    assert rows(m)["ovs2"]["state"] == "blocked"
    got = send(m, "ovs2", N, 587)
    assert never_completed(got, N), f"587 from a blocked VM on OVS: {got} of {N}"
    m.sh(f"{SG} release ovs2 --reason 'system test: ovs done'")
    assert send(m, "ovs2", N, 587) == {"completed": N}


def test_ceiling_holds_on_ovs(ovs_host: Machine) -> None:
    """A class's ceiling holds on OVS: of three times its per-minute rate
    sent at once on 587, at most rate + burst connections complete (and
    some do: a ceiling is not a block)."""
    m = ovs_host
    r = rows(m)["ovs3"]
    assert r["class"] == "tight", r
    n = 3 * 3  # three times the rate a minute (TIGHT)
    got = send(m, "ovs3", n, 587)
    done = got.get("completed", 0)
    assert 1 <= done <= TIGHT_MAX and got.get("failed", 0) == 0, \
        f"587 from a VM on OVS under 3/minute, burst 1: {got} of {n}"
    note(f"ceiling 3/minute, burst 1 on an OVS port: {got} of {n} at once")


def test_ovs_port_without_ifalias_is_named_by_its_external_ids(ovs_host: Machine) -> None:
    """An OVS port with no ifalias is the VM its Interface's external_ids
    name: vm-uuid (or libvirt's vm-id) gives the VM id, that UUID lowercased;
    a port with only an iface-id is "ovs:<iface-id>". Never the tap's name
    (or its pattern capture): those are the hypervisor's to reuse. The VM so
    named is enforced and counted under that id."""
    m = ovs_host
    m.sh(f"{LAB} vm osa --index 7 --ifname {TAP_A} --mac {MAC_A} --host-mac fe{MAC_A[2:]} "
         f"--external-id iface-id={IFACE_A} --external-id vm-uuid={VM_UUID} "
         f"--external-id attached-mac={MAC_A} --external-id iface-status=active && "
         f"{LAB} vm osb --index 8 --ifname {TAP_B} --mac {MAC_B} --host-mac fe{MAC_B[2:]} "
         f"--external-id iface-id={IFACE_B} --external-id attached-mac={MAC_B}")
    vm_a, vm_b = VM_UUID.lower(), f"ovs:{IFACE_B}"
    a = listed(m, vm_a, TAP_A, "ovs")
    b = listed(m, vm_b, TAP_B, "ovs")
    assert (a["interfaces"], a["source"], a.get("attachment")) == ([TAP_A], "ovs", "ovs"), a
    assert (b["interfaces"], b["source"], b.get("attachment")) == ([TAP_B], "ovs", "ovs"), b
    names = set(rows(m))
    for stale in (TAP_A, TAP_B, IFACE_A[:11], IFACE_B[:11]):
        assert stale not in names, f"a VM named {stale!r} (its tap) is listed: {sorted(names)}"
    got = send(m, "osa", N, 25)
    assert never_completed(got, N), f"port 25 from {vm_a} on OVS: {got} of {N}"
    assert counted(m, vm_a, "attempts_1h", N)["attempts_1h"] == N


def test_vm_moved_from_a_linux_bridge_to_ovs_keeps_its_block(ovs_host: Machine) -> None:
    """A blocked VM whose interface leaves a Linux bridge for an OVS bridge
    (`ip link set nomaster`, `ovs-vsctl add-port`) stays blocked there from
    its first SYN on OVS: 0 of N on 587, sent as soon as the move returns;
    released, it gets through on OVS."""
    m = ovs_host
    assert send(m, "ovs4", 2, 587) == {"completed": 2}  # bridged, to the sink on OVS
    m.sh(f"{SG} block ovs4 --for 1h --reason 'system test: moved to ovs'")
    got = send(m, "ovs4", N, 587)
    assert never_completed(got, N), f"587 from a blocked bridged VM: {got} of {N}"
    r = m.sh(f"{LAB} move veth-sgovs4 --to ovs && "
             f"{LAB} send ovs4 --connections {N} --port 587 --timeout 5")
    got = json.loads(r.out.splitlines()[-1])
    assert "veth-sgovs4" in m.sh("ovs-vsctl list-ports sgovs-br").out
    assert never_completed(got, N), f"587 from a blocked VM moved to OVS: {got} of {N}"
    r = listed(m, "ovs4", "veth-sgovs4", "ovs")
    assert (r["state"], r.get("attachment")) == ("blocked", "ovs"), r
    m.sh(f"{SG} release ovs4 --reason 'system test: moved'")
    assert send(m, "ovs4", 2, 587) == {"completed": 2}


def test_resets_where_the_kernel_has_a_reject_module(ovs_host: Machine) -> None:
    """Port 25 is refused with a TCP reset where this kernel can send one in
    the hook that sees the VM's frames, and dropped where it cannot: a Linux
    bridge port (bridge family: nft_reject_bridge) gets a reset; an OVS port
    (netdev ingress: nft_reject_netdev, not built in Debian 12's 6.1) gets a
    reset only if that module exists, else no answer. Never a completed
    connection."""
    m = ovs_host
    krel = m.sh("uname -r").out.strip()
    have = {mod: m.sh(f"modprobe {mod}", check=False).rc == 0
            for mod in ("nft_reject_bridge", "nft_reject_inet", "nft_reject_netdev")}
    note(f"reject modules on {krel}: " + ", ".join(
        f"{mod} {'yes' if ok else 'no'}" for mod, ok in have.items()))
    assert have["nft_reject_bridge"] and have["nft_reject_inet"], have
    bridged = send(m, "br6", N, 25)
    assert bridged == {"refused": N}, f"port 25 from a bridged VM: {bridged}"
    on_ovs = send(m, "ovs5", N, 25)
    want = "refused" if have["nft_reject_netdev"] else "no_answer"
    assert on_ovs == {want: N}, f"port 25 from a VM on OVS (expected {want}): {on_ovs}"
    note(f"port 25 on {krel}: Linux bridge port {bridged}, OVS port {on_ovs}")
