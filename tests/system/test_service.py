"""smtpguard installed and run as the README's operator guide says, under
systemd as PID 1, on Debian 12's own kernel (with its headers package), in a
QEMU machine: `apt install ./smtpguard_*.deb`, then what the unit promises
(READY=1, the watchdog, Restart=on-failure, reload, stop leaving
enforcement, SMTPGUARD_STOP_CLEANUP), the journal's fields, the hardening
with every feature, the figure the README gives for it, and the package's
own promises: an upgrade while a VM hammers port 25 lets nothing through
and keeps blocks, offences and the edited policy; a purge leaves nothing.

The tests run in order on one machine, as one operator session; lab VMs are
namespaces plugged into the machine's own bridge (guestlab.py), so the agent
systemd runs sees them as it would a hypervisor's guests.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from machine import ROOT, Machine, note, timing

from smtpguard import __version__

# TCG runs the machine ~10x slower than the host: an image build, a boot and
# `make install` can take minutes on a cold cache.
pytestmark = pytest.mark.timeout(1800)

PACKAGES = True  # conftest: the .debs on the machine's checkout disk
SG = "/usr/bin/smtpguard"
PY = "/usr/lib/smtpguard/venv/bin/python"
# The lab runs from a copy of the package's venv (made after the install), so
# that it goes on sending while an upgrade replaces the package's files.
LAB = "/root/labvenv/bin/python /root/smtpguard/tests/system/guestlab.py"
POLICY = "/etc/smtpguard/policy.yaml"
DEBS = "/mnt/src/debs"
VERSION = __version__


# -- helpers --------------------------------------------------------------
def send(m: Machine, vm: int, n: int, port: int, timeout: float = 5.0) -> dict[str, int]:
    r = m.sh(f"{LAB} send {vm} --connections {n} --port {port} --timeout {timeout}")
    result: dict[str, int] = json.loads(r.out.splitlines()[-1])
    return result


def unit(m: Machine) -> dict[str, str]:
    out = m.sh("systemctl show smtpguard -p ActiveState,SubState,MainPID,NRestarts,Result").out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def events(m: Machine, name: str | None = None, since: str = "") -> list[dict[str, Any]]:
    """The agent's journal entries (-o json), optionally one event's."""
    cmd = "journalctl -u smtpguard -o json --no-pager" + (f" --since '{since}'" if since else "")
    out = []
    for line in m.sh(cmd).out.splitlines():
        entry = json.loads(line)
        if "SMTPGUARD_EVENT" in entry and (name is None or entry["SMTPGUARD_EVENT"] == name):
            out.append(entry)
    return out


def wait(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {got!r})")
        time.sleep(every)


def wait_restarted(m: Machine, old_pid: str, restarts: int, timeout: float) -> dict[str, str]:
    def running() -> dict[str, str] | None:
        u = unit(m)
        ok = (u["ActiveState"] == "active" and u["MainPID"] not in ("0", old_pid)
              and int(u["NRestarts"]) >= restarts)
        return u if ok else None

    result: dict[str, str] = wait("the agent restarted", running, timeout)
    return result


def edit_policy(m: Machine, code: str) -> None:
    """Change the installed policy with Python over `p` (the parsed YAML),
    written beside it and renamed into place, as an editor does."""
    script = (f"import yaml; p = yaml.safe_load(open('{POLICY}')); {code}; "
              f"yaml.safe_dump(p, open('{POLICY}.new', 'w'), sort_keys=False)")
    m.sh(f"{PY} -c \"{script}\" && chmod 600 {POLICY}.new && mv {POLICY}.new {POLICY}")


def our_filters(m: Machine, dev: str) -> int:
    out = m.sh(f"tc filter show dev {dev} ingress; tc filter show dev {dev} egress").out
    return out.count("smtpg_")


# -- the operator's path --------------------------------------------------
def test_apt_install_the_package_as_the_readme_says(machine: Machine) -> None:
    """The build an upgrade starts from (package.py: this build, version
    lowered), installed as the README says: apt pulls nothing (this machine
    has no mirror: the dependencies are in the image), the postinst stores
    the classifier for Debian's own kernel, and the service is enabled and
    started, READY=1 before apt returns."""
    m = machine
    m.sh("cp -a /mnt/src/smtpguard /root/smtpguard")
    r, seconds = m.timed(f"cd {DEBS} && DEBIAN_FRONTEND=noninteractive "
                         f"apt-get install -y ./smtpguard_{VERSION}~prev_amd64.deb 2>&1",
                         timeout=1200)
    timing("apt install ./smtpguard_*.deb (in the machine)", seconds)
    assert "0 newly installed" not in r.out and "smtpguard" in r.out, r.out
    assert m.sh("dpkg-query -W -f '${Status} ${Version}' smtpguard").out == \
        f"install ok installed {VERSION}~prev"
    assert m.sh(f"{SG} version").out.strip() == f"smtpguard {VERSION}"
    u = unit(m)
    assert (u["ActiveState"], u["SubState"]) == ("active", "running"), u
    assert m.sh("systemctl is-enabled smtpguard").out.strip() == "enabled"
    # The postinst compiled the classifier for this kernel and stored it: the
    # first start loaded it with bpf(2), no bcc, no compile.
    loaded = events(m, "bpf.loaded")[0]
    assert (loaded["SMTPGUARD_SOURCE"], loaded["SMTPGUARD_COMPILED"]) == ("cache", "false"), \
        loaded
    # Debian's own kernel: its headers package, not the fallback link.
    krel = m.sh("uname -r").out.strip()
    assert re.fullmatch(r"6\.1\.\d+-\d+-cloud-amd64", krel), krel
    build = m.sh(f"readlink -f /lib/modules/{krel}/build").out.strip()
    assert build == f"/usr/src/linux-headers-{krel}", build
    # --man=no: this minimal system has no man(1) to check Documentation=man:... with.
    assert m.sh("systemd-analyze verify --man=no smtpguard.service 2>&1").out == ""
    assert m.sh(f"stat -c '%a %U' {POLICY} /var/lib/smtpguard").out.split("\n")[:2] == \
        ["600 root", "700 root"]
    assert m.sh("dpkg-query -W -f '${Conffiles}' smtpguard").out.split()[::2] == \
        ["/etc/default/smtpguard", "/etc/libvirt/hooks/qemu.d/smtpguard", POLICY]
    m.sh("test -s /usr/share/man/man8/smtpguard.8.gz && "
         "test -s /usr/share/man/man5/smtpguard-policy.5.gz")
    m.sh("cp -a /usr/lib/smtpguard/venv /root/labvenv")


def test_restart_returns_once_classifier_tables_and_socket_are_up(machine: Machine) -> None:
    m = machine
    m.sh(f"{LAB} up --vms 2")
    wait("the lab VMs attached", lambda: our_filters(m, "veth-sgsys2") > 0, 60)
    # Everything checked in the same command, the moment systemctl returns:
    # Type=notify makes it wait for READY=1.
    r, seconds = m.timed(
        "systemctl restart smtpguard && "
        "tc filter show dev veth-sgsys1 ingress && nft list tables && "
        "test -S /run/smtpguard/control.sock && echo socket-up", timeout=600)
    timing("systemctl restart (the pinned build)", seconds)
    assert "smtpg_" in r.out and "socket-up" in r.out, r.out
    assert "table bridge smtpguard" in r.out and "table inet smtpguard" in r.out, r.out
    u = unit(m)
    assert (u["ActiveState"], u["SubState"]) == ("active", "running"), u
    status = json.loads(m.sh(f"{SG} status --json").out)
    assert {v["vm"] for v in status} >= {"vm1", "vm2"}, status


def test_bridged_vms_get_resets_on_this_kernel(machine: Machine) -> None:
    """Debian's kernel has nft_reject_bridge: the probe says so, and port-25
    SYNs from a bridged VM are answered with a reset (refused, at once)."""
    m = machine
    applied = events(m, "enforce.applied")[-1]
    assert applied["SMTPGUARD_REJECT_BRIDGE"] == "true", applied
    assert applied["SMTPGUARD_REJECT_INET"] == "true", applied
    assert send(m, 1, 5, 25) == {"refused": 5}
    assert send(m, 2, 3, 587) == {"completed": 3}  # within its class's limit


def test_control_socket_is_root_only(machine: Machine) -> None:
    m = machine
    assert m.sh("stat -c '%a' /run/smtpguard /run/smtpguard/control.sock").out.split() == \
        ["700", "600"]
    r = m.sh(f"setpriv --reuid=65534 --regid=65534 --clear-groups {SG} status", check=False)
    assert r.rc != 0 and "ermission denied" in r.out + r.err, r


def test_block_from_the_cli_and_its_journal_fields(machine: Machine) -> None:
    m = machine
    m.sh(f"{SG} block vm2 --for 1h --reason 'system test'")
    assert send(m, 2, 3, 587).get("completed", 0) == 0
    blocked = events(m, "vm.blocked")[-1]
    assert blocked["SMTPGUARD_VM"] == "vm2" and blocked["PRIORITY"] in ("4", "5", "6"), blocked
    assert blocked["SYSLOG_IDENTIFIER"] == "smtpguard"
    line = json.loads(blocked["MESSAGE"])  # `journalctl -o cat` still gives JSON lines
    assert line["event"] == "vm.blocked" and line["vm"] == "vm2", line
    names = {e["SMTPGUARD_EVENT"] for e in events(m)}
    assert {"agent.started", "bpf.loaded", "enforce.applied", "control.listening",
            "iface.attached", "vm.blocked"} <= names, names


def test_watchdog_kills_a_hung_agent_while_enforcement_holds(machine: Machine) -> None:
    m = machine
    before = unit(m)
    m.sh(f"kill -STOP {before['MainPID']}")
    t0 = time.monotonic()
    outcomes: list[dict[str, int]] = []
    while unit(m)["MainPID"] == before["MainPID"]:  # hung, then killed
        outcomes += [send(m, 2, 2, 587), send(m, 1, 2, 25)]
        assert time.monotonic() - t0 < 180, "the watchdog never fired"
    u = wait_restarted(m, before["MainPID"], int(before["NRestarts"]) + 1, 180)
    timing("SIGSTOP to the restarted agent (WatchdogSec=30s)", time.monotonic() - t0)
    assert outcomes and all(o.get("completed", 0) == 0 for o in outcomes), outcomes
    assert sum(sum(o.values()) for o in outcomes) == 4 * (len(outcomes) // 2)
    log = m.sh("journalctl -u smtpguard -o cat --no-pager | grep -i watchdog").out
    assert "Watchdog timeout" in log, log
    assert int(u["NRestarts"]) == int(before["NRestarts"]) + 1
    # The block came back from the state store.
    assert send(m, 2, 2, 587).get("completed", 0) == 0


def test_restart_on_failure_after_sigkill(machine: Machine) -> None:
    m = machine
    before = unit(m)
    m.sh(f"kill -KILL {before['MainPID']}")
    t0 = time.monotonic()
    held = send(m, 2, 2, 587)  # while systemd waits RestartSec
    u = wait_restarted(m, before["MainPID"], int(before["NRestarts"]) + 1, 180)
    timing("SIGKILL to the restarted agent (RestartSec=2s)", time.monotonic() - t0)
    assert held.get("completed", 0) == 0, held
    assert u["SubState"] == "running"
    assert events(m, "bpf.loaded")[-1]["SMTPGUARD_COMPILED"] == "false"  # the pinned build
    assert send(m, 2, 2, 587).get("completed", 0) == 0


def test_reload_applies_a_changed_policy_and_keeps_a_broken_one_out(machine: Machine) -> None:
    m = machine
    gen = int(events(m, "agent.started")[-1].get("SMTPGUARD_POLICY_GENERATION", "0"))
    reloaded = events(m, "policy.reloaded")
    m.sh("systemctl reload smtpguard")  # ExecReload: SIGHUP, nothing changed
    wait("policy.reloaded after systemctl reload",
         lambda: len(events(m, "policy.reloaded")) > len(reloaded), 60)
    assert int(events(m, "policy.reloaded")[-1]["SMTPGUARD_POLICY_GENERATION"]) > gen
    # Port 25 allowed for the default class, and the abuse desk's webhook.
    m.sh(f"setsid {PY} /root/smtpguard/tests/system/hook_receiver.py 8025 /run/sgsys-hook.jsonl "
         "</dev/null >/dev/null 2>&1 &")
    wait("the webhook receiver", lambda: m.sh("test -e /run/sgsys-hook.jsonl", check=False)
         .rc == 0, 60)
    edit_policy(m, "p['classes']['default']['port25'] = 'allow'; "
                   "p['webhook'] = {'url': 'http://127.0.0.1:8025/hook'}")
    m.sh("systemctl reload smtpguard")
    wait("vm1's port 25 open after the reload", lambda: send(m, 1, 2, 25) == {"completed": 2}, 60)
    m.sh(f"{SG} release vm2 --reason 'system test done'")
    assert send(m, 2, 2, 587) == {"completed": 2}

    def posted() -> list[dict[str, Any]]:
        text = m.sh("cat /run/sgsys-hook.jsonl").out
        return [b for b in map(json.loads, text.splitlines()) if b.get("vm") == "vm2"]

    hooks = wait("the webhook's released event", posted, 60)
    assert hooks[-1]["event"] == "vm.released", hooks
    # A broken policy: named by file, line and field; the running one stays.
    m.sh(f"cp {POLICY} /root/policy.good && sed -i 's/^mode: enforce/mode: enforse/' {POLICY}")
    r = m.sh("systemctl reload smtpguard && sleep 1 && " + SG + " reload", check=False)
    assert r.rc != 0 and "rejected" in r.out + r.err, r
    rejected = events(m, "policy.rejected")[-1]
    assert re.search(r"policy\.yaml:\d+:\d+: mode", rejected["MESSAGE"]), rejected
    assert unit(m)["ActiveState"] == "active"
    assert send(m, 1, 2, 25) == {"completed": 2}  # still the allow policy
    m.sh(f"cp /root/policy.good {POLICY} && systemctl reload smtpguard")


def test_iptables_backend_under_the_hardening(machine: Machine) -> None:
    """The other backend, started by systemd with the unit's capabilities.
    The unit may not load kernel modules: on this host (nftables, as Debian
    12 ships it) iptables-legacy is not loaded, so the switch fails with what
    to load, and nftables keeps enforcing. Loaded, as on a host that runs
    iptables-legacy, it enforces (bridged VMs through br_netfilter)."""
    m = machine
    edit_policy(m, "p['classes']['default']['port25'] = 'block'")
    m.sh("systemctl reload smtpguard")
    wait("port 25 blocked again", lambda: send(m, 1, 2, 25) == {"refused": 2}, 60)
    edit_policy(m, "p['enforcement'] = {'backend': 'iptables'}")
    assert m.sh("systemctl restart smtpguard", check=False).rc != 0
    failed = m.sh("journalctl -u smtpguard -o cat --no-pager -n 30").out
    assert "modprobe -a ip_tables iptable_filter ip6_tables ip6table_filter" in failed, failed
    assert "table bridge smtpguard" in m.sh("nft list tables").out  # not removed
    assert send(m, 1, 3, 25) == {"refused": 3}  # still enforced, by nftables
    m.sh("modprobe -a ip_tables iptable_filter ip6_tables ip6table_filter br_netfilter && "
         "sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1")
    m.sh("systemctl restart smtpguard")
    assert events(m, "enforce.backend")[-1]["SMTPGUARD_BACKEND"] == "iptables"
    assert "SMTPG" in m.sh("iptables-legacy -S FORWARD").out
    assert "smtpguard" not in m.sh("nft list tables").out  # the switch removed them
    # Rejected, but the reset is routed by the host, which has no address on
    # this bridge: the VM sees no answer (the README says so).
    assert send(m, 1, 3, 25) == {"no_answer": 3}
    assert send(m, 2, 2, 587) == {"completed": 2}  # the limited ports still pass
    edit_policy(m, "p['enforcement'] = {'backend': 'nftables'}")
    m.sh("systemctl restart smtpguard")
    assert "SMTPG" not in m.sh("iptables-legacy-save").out
    assert "table bridge smtpguard" in m.sh("nft list tables").out
    assert send(m, 1, 3, 25) == {"refused": 3}
    m.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0")


def test_stop_leaves_enforcement_and_cleanup_removes_it(machine: Machine) -> None:
    m = machine
    m.sh("systemctl stop smtpguard")
    assert unit(m)["ActiveState"] == "inactive"
    assert our_filters(m, "veth-sgsys1") > 0
    assert "table bridge smtpguard" in m.sh("nft list tables").out
    assert send(m, 1, 3, 25) == {"refused": 3}  # enforced with no agent
    r, seconds = m.timed("systemctl start smtpguard")
    timing("systemctl start (restart: the pinned build, no compile)", seconds)
    assert events(m, "bpf.loaded")[-1]["SMTPGUARD_COMPILED"] == "false"
    m.sh("sed -i 's/^SMTPGUARD_STOP_CLEANUP=.*/SMTPGUARD_STOP_CLEANUP=yes/' /etc/default/smtpguard")
    m.sh("systemctl stop smtpguard")
    assert our_filters(m, "veth-sgsys1") == 0
    assert "smtpguard" not in m.sh("nft list tables").out
    assert m.sh("ls /sys/fs/bpf/smtpguard 2>/dev/null | wc -l").out.strip() == "0"
    assert send(m, 1, 3, 25) == {"completed": 3}  # nothing left enforcing
    m.sh("sed -i 's/^SMTPGUARD_STOP_CLEANUP=.*/SMTPGUARD_STOP_CLEANUP=no/' /etc/default/smtpguard"
         " && systemctl start smtpguard")
    assert send(m, 1, 3, 25) == {"refused": 3}


def test_security_figure_is_the_one_the_readme_gives(machine: Machine) -> None:
    out = machine.sh("systemd-analyze security smtpguard.service --no-pager 2>&1").out
    version = machine.sh("systemctl --version").out.split()[1]
    got = re.search(r"Overall exposure level for smtpguard\.service: (\d+\.\d+) (\w+)", out)
    assert got, out
    readme = (ROOT / "README.md").read_text()
    said = re.search(r"`systemd-analyze\s+security`\s+\(systemd\s+\d+,\s+Debian\s+12\)\s+rates"
                     r"\s+it\s+exposure\s+level\s+(\d+\.\d+)\s+\((\w+)\)", readme)
    assert said, "the README states no systemd-analyze security figure"
    assert (got[1], got[2]) == (said[1], said[2]), (got.group(0), said.group(0))
    note(f"systemd-analyze security (systemd {version}): exposure level {got[1]} {got[2]}")


# -- the package's lifecycle ----------------------------------------------
def history(m: Machine, vm: str) -> list[dict[str, Any]]:
    """The VM's transitions in the state store (the offences), over the socket."""
    code = ("import json; from pathlib import Path; from smtpguard.api.control import request; "
            "print(json.dumps(request(Path('/run/smtpguard/control.sock'), "
            f"{{'cmd': 'history', 'vm': '{vm}'}})))")
    transitions: list[dict[str, Any]] = json.loads(m.sh(f"{PY} -c \"{code}\"").out)["transitions"]
    return transitions


def vm_row(m: Machine, vm: str) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in json.loads(m.sh(f"{SG} status --json").out)
                               if r["vm"] == vm)
    return row


def test_upgrade_while_vms_hammer_lets_nothing_through(machine: Machine) -> None:
    """From the previous build to this one while vm1 hammers port 25 and the
    blocked vm2 port 587: not one connection completes, vm2 keeps its block
    and its offences, the operator's edited policy is kept (dpkg does not
    ask: the package's own copy did not change), and the restart does not
    clean up even where SMTPGUARD_STOP_CLEANUP=yes asks a stop to."""
    m = machine
    m.sh(f"{SG} block vm2 --for 1h --reason 'before the upgrade'")
    m.sh(f"echo '# edited by the abuse desk' >>{POLICY} && systemctl reload smtpguard")
    m.sh("sed -i 's/^SMTPGUARD_STOP_CLEANUP=.*/SMTPGUARD_STOP_CLEANUP=yes/' /etc/default/smtpguard")
    policy = m.sh(f"sha256sum {POLICY}").out
    before, offences = vm_row(m, "vm2"), history(m, "vm2")
    assert before["state"] == "blocked" and offences, (before, offences)
    old_pid = unit(m)["MainPID"]
    m.sh("rm -f /run/sgsys-stop; setsid sh -c 'while [ ! -e /run/sgsys-stop ]; do "
         f"printf \"%s 1 \" $(date +%s.%N); {LAB} send 1 --connections 10 --port 25 --timeout 1; "
         f"printf \"%s 2 \" $(date +%s.%N); {LAB} send 2 --connections 10 --port 587 --timeout 1; "
         "done' </dev/null >/run/sgsys-hammer.txt 2>&1 & echo $! >/run/sgsys-hammer.pid")
    wait("the hammer's first round", lambda: m.sh("grep -c ' 2 {' /run/sgsys-hammer.txt",
                                                  check=False).out.strip() not in ("", "0"), 120)
    r, seconds = m.timed(f"cd {DEBS} && DEBIAN_FRONTEND=noninteractive "
                         f"apt-get install -y ./smtpguard_{VERSION}_amd64.deb 2>&1", timeout=1200)
    timing("apt install: the upgrade, the agent restarted", seconds)
    assert f"Unpacking smtpguard ({VERSION}) over ({VERSION}~prev)" in r.out, r.out
    rounds = int(m.sh("grep -c ' 2 {' /run/sgsys-hammer.txt").out)
    wait("two more rounds after the upgrade", lambda: int(m.sh(
        "grep -c ' 2 {' /run/sgsys-hammer.txt").out) >= rounds + 2, 120)
    m.sh("touch /run/sgsys-stop; while kill -0 $(cat /run/sgsys-hammer.pid) 2>/dev/null; "
         "do sleep 0.2; done")
    sent: dict[str, dict[str, int]] = {"1": {}, "2": {}}
    stamps = []
    for line in m.sh("cat /run/sgsys-hammer.txt").out.splitlines():
        stamp, vm, result = line.split(" ", 2)
        stamps.append(float(stamp))
        for outcome, n in json.loads(result).items():
            sent[vm][outcome] = sent[vm].get(outcome, 0) + n
    assert sent["1"].get("completed", 0) == 0 and sent["2"].get("completed", 0) == 0, sent
    u = unit(m)
    assert (u["ActiveState"], u["SubState"]) == ("active", "running") and u["MainPID"] != old_pid
    started = float(m.sh("systemctl show smtpguard -p ExecMainStartTimestamp --timestamp=unix "
                         "--value").out.strip().lstrip("@"))
    assert min(stamps) < started < max(stamps), (min(stamps), started, max(stamps))
    note(f"upgrade under the hammer: vm1 port 25 {sent['1']}, blocked vm2 port 587 "
         f"{sent['2']}; {len(stamps)} rounds, the new agent started at +"
         f"{started - min(stamps):.1f} s")
    assert m.sh("dpkg-query -W -f '${Status} ${Version}' smtpguard").out == \
        f"install ok installed {VERSION}"
    after = vm_row(m, "vm2")
    assert (after["state"], after["until"], after["reason"]) == \
        (before["state"], before["until"], before["reason"]), (before, after)
    assert history(m, "vm2")[:len(offences)] == offences
    assert m.sh(f"sha256sum {POLICY}").out == policy
    assert m.sh(f"ls {POLICY}.dpkg-* /run/smtpguard.upgrading 2>/dev/null | wc -l").out.strip() \
        == "0"
    assert events(m, "bpf.loaded")[-1]["SMTPGUARD_COMPILED"] == "false"  # the postinst's build
    assert send(m, 1, 3, 25).get("completed", 0) == 0
    m.sh("sed -i 's/^SMTPGUARD_STOP_CLEANUP=.*/SMTPGUARD_STOP_CLEANUP=no/' /etc/default/smtpguard")


def test_remove_leaves_enforcement_and_state(machine: Machine) -> None:
    """On the iptables backend (so that the purge after it has chains and
    ipsets to remove): apt remove stops the agent and leaves all of it."""
    m = machine
    edit_policy(m, "p['enforcement'] = {'backend': 'iptables'}")
    m.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1"
         " && systemctl restart smtpguard")
    assert events(m, "enforce.backend")[-1]["SMTPGUARD_BACKEND"] == "iptables"
    r = m.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y smtpguard 2>&1")
    assert "enforcement stays in the kernel" in r.out, r.out
    assert m.sh("dpkg-query -W -f '${Status}' smtpguard").out == "deinstall ok config-files"
    assert our_filters(m, "veth-sgsys1") > 0
    assert "SMTPG" in m.sh("iptables-legacy-save").out
    assert "SMTPG-BLOCK4" in m.sh("ipset list -n").out  # vm2's block
    assert m.sh("test -e /var/lib/smtpguard && test -e /etc/smtpguard/policy.yaml && "
                "test ! -e /usr/bin/smtpguard && echo kept").out.strip() == "kept"
    assert send(m, 1, 3, 25).get("completed", 0) == 0
    assert send(m, 2, 3, 587).get("completed", 0) == 0


def test_purge_leaves_nothing(machine: Machine) -> None:
    """Everything goes: the iptables backend's chains, rules and ipsets, the
    tc filters, the pins, state and configuration, and nftables tables (put
    here by hand, as an agent on nftables would have left them)."""
    m = machine
    m.sh("nft add table bridge smtpguard && nft add table inet smtpguard && "
         "nft add table netdev smtpguard")
    m.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y smtpguard 2>&1")
    assert m.sh("dpkg-query -W -f '${Status}' smtpguard 2>&1", check=False).out != \
        "deinstall ok config-files"
    filters = m.sh("for d in $(ls /sys/class/net); do tc filter show dev $d ingress; "
                   "tc filter show dev $d egress; done 2>/dev/null").out
    assert "smtpg_" not in filters, filters
    assert "smtpguard" not in m.sh("nft list tables").out
    assert "SMTPG" not in m.sh("iptables-legacy-save; ip6tables-legacy-save; ipset list -n").out
    assert "FORWARD" in m.sh("iptables-legacy-save").out  # the table stays, without us
    left = m.sh("ls -d /sys/fs/bpf/smtpguard /var/lib/smtpguard /etc/smtpguard "
                "/etc/default/smtpguard /etc/libvirt/hooks/qemu.d/smtpguard /usr/lib/smtpguard "
                "/run/smtpguard /lib/systemd/system/smtpguard.service 2>/dev/null", check=False)
    assert left.out == "", left.out
    assert send(m, 1, 3, 25) == {"completed": 3}  # nothing enforcing any more
    assert send(m, 2, 3, 587) == {"completed": 3}
    m.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0")
