"""Proxmox naming with a real agent: taps named tap<vmid>i<n> are the VM of
/etc/pve's config (fixture files in Proxmox's format), with its name, its
tenant and class from tags, one VM across its two NICs; the block follows
the VMID, not the tap."""

from __future__ import annotations

from pathlib import Path

from conftest import lab_with_agent, require_root, send
from smtpguard.lab import topology

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "pve"


def test_proxmox_vmids_name_the_vms(tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""version: 1
inventory:
  libvirt: {{enabled: false}}
  proxmox: {{enabled: true, root: "{FIXTURES}"}}
classes:
  default: {{port25: block, thresholds: []}}
  trusted: {{port25: allow, thresholds: []}}
""")
    with lab_with_agent(tmp_path, 2, policy, enforce=True, start=False) as (lab, agent):
        topology.replug_vm(lab, "vm1", "tap100i0")
        topology.replug_vm(lab, "vm2", "tap100i1")  # the same VM's second NIC
        agent.start()
        rows = {r["vm"]: r for r in agent.ctl("status", "--json")}  # type: ignore[union-attr]
        r = rows["pve:100"]
        assert (r["name"], r["tenant"], r["class"], r["source"]) == (
            "web1", "acme", "trusted", "proxmox")
        assert r["interfaces"] == ["tap100i0", "tap100i1"]
        assert send(lab, "vm1", 2, port=25).get("completed") == 2  # trusted: 25 allowed
        agent.ctl("block", "web1", "--for", "1h", "--reason", "by name")
        assert send(lab, "vm2", 2, port=587, timeout=2).get("completed", 0) == 0
        topology.replug_vm(lab, "vm1", "tap100i2")  # restarted NIC, new tap
        agent.wait_event("enforce.followed", vm="pve:100", interface="tap100i2")
        assert send(lab, "vm1", 2, port=587, timeout=2).get("completed", 0) == 0
