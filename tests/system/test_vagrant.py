"""The Vagrant box for real: `vagrant up` of vagrant/Vagrantfile boots a Debian
12 box built here from Debian packages (scripts/vagrant-box.sh), its
provisioner runs the project's own `make setup` without the internet, and the
lab demo (`sudo make run`) shows detection and enforcement in the guest and
cleans up when it is stopped. One machine for the module (vagrantkit.py);
the timings are in the tier's summary at the end of the run."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from machine import timing
from vagrantkit import DemoRun, VagrantVM, have_tools

from smtpguard import __version__

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(3600)]


def _root_or_fail() -> None:
    # Module fixtures run before tests/conftest.py's per-test gate: same rule.
    if os.geteuid() != 0:  # as the rest of the system tier: never a skip
        pytest.fail("the vagrant test needs root (libvirtd, loop devices, mmdebstrap)")
    missing = have_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)} (scripts/hypervisor-setup.sh installs them)")


@pytest.fixture(scope="module")
def vm(request: pytest.FixtureRequest) -> Iterator[VagrantVM]:
    _root_or_fail()
    kit = VagrantVM()
    try:
        with kit:
            kit.up()
            kit.provision()
            yield kit
    finally:  # in the tier's summary at the end of the run
        for what, seconds in kit.timings.items():
            timing(f"vagrant: {what}", seconds)


def _both_vms_counted(run: DemoRun) -> bool:
    """vm1 (mail relay client) completed a dialogue and vm2 (the spam bot)
    has attempts smtpguard blocked."""
    rows = run.rows()
    vm1 = any(r.get("vm") == "vm1" and int(r.get("done", "0")) > 0 for r in rows)
    vm2 = any(r.get("vm") == "vm2" and int(r.get("blocked", "0")) > 0 for r in rows)
    return vm1 and vm2


def _guest_clean(vm: VagrantVM) -> None:
    """No lab namespace, no smtpguard table, no pins and no agent left."""
    out = vm.ssh("sudo ip netns list; sudo nft list tables; "
                 "sudo ls /sys/fs/bpf/smtpguard 2>/dev/null; "
                 "pgrep -a -f '[s]mtpguard[.]cli|[s]mtpguard lab' || true")
    assert out.rc == 0, out.out
    assert "sglab" not in out.out, out.out
    assert "smtpguard" not in out.out, out.out


def test_boots_debian_with_systemd_and_is_provisioned_offline(vm: VagrantVM) -> None:
    """The box boots from its own disk into Debian 12 with systemd as PID 1 on
    Debian's kernel, whose matching headers bcc uses; `make setup` made the
    venv from the wheelhouse alone (pip has no index)."""
    out = vm.ssh("cat /etc/debian_version; ps -p 1 -o comm=; uname -r; "
                 "readlink -f /lib/modules/$(uname -r)/build; "
                 "/vagrant/.venv/bin/smtpguard version; "
                 "/vagrant/.venv/bin/python -m pip config list; "
                 "/vagrant/.venv/bin/python -c 'import bcc, nftables, pyroute2' && echo imports-ok")
    assert out.rc == 0, out.out
    lines = out.out.splitlines()
    assert lines[0].startswith("12."), out.out
    assert lines[1] == "systemd", out.out
    krel = lines[2]
    assert krel.endswith("-cloud-amd64"), out.out
    assert lines[3] == f"/usr/src/linux-headers-{krel}", out.out
    assert lines[4] == f"smtpguard {__version__}", out.out
    assert "global.no-index='true'" in out.out, out.out
    assert "imports-ok" in out.out, out.out
    # The management network is isolated: no route beyond it.
    route = vm.ssh("ip route show default; ping -c1 -W2 1.1.1.1 >/dev/null 2>&1 && echo reached")
    assert "reached" not in route.out, route.out


def test_make_run_shows_detection_and_cleans_up_on_ctrl_c(vm: VagrantVM) -> None:
    """`sudo make run` in the guest, its output on a pipe: plain `vm=... attempts=...`
    rows show the relay client's mail done and the spam bot blocked; SIGINT
    to its process group (a terminal's Ctrl-C) ends it with the lab removed."""
    run = vm.demo(signal.SIGINT, "make run", _both_vms_counted)
    vm.timings["demo: first row"] = run.seconds_to_first_row or 0.0
    vm.timings["demo: exit after SIGINT"] = run.seconds_to_exit_after_signal or 0.0
    vm.timings["demo (make run) in all"] = run.seconds_total or 0.0
    rows = run.rows()
    assert {r["vm"] for r in rows} >= {"vm1", "vm2"}, run.text
    for r in rows:
        assert int(r["blocked"]) <= int(r["attempts"]), r
    assert "\x1b[" not in run.text, "escape sequences on a pipe"
    assert "lab removed." in run.text, run.text
    _guest_clean(vm)


def test_demo_cleans_up_on_sigterm(vm: VagrantVM) -> None:
    """The demo itself (as a service manager would stop it) ends on SIGTERM
    with everything removed, once it shows rows."""
    run = vm.demo(signal.SIGTERM, ".venv/bin/smtpguard lab demo",
                  lambda r: len(r.rows()) >= 2)
    vm.timings["demo 2: exit after SIGTERM"] = run.seconds_to_exit_after_signal or 0.0
    vm.timings["demo 2 in all"] = run.seconds_total or 0.0
    assert run.rc == 0, run.text
    assert "lab removed." in run.text, run.text
    _guest_clean(vm)
