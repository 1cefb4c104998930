"""Which source names a VM, and the hook's synchronous announcements."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from test_inventory_domxml import UUID, live

from smtpguard.inventory.hook import HookSource
from smtpguard.inventory.identity import Identity
from smtpguard.inventory.proxmox import ProxmoxSource
from smtpguard.inventory.resolve import Resolver
from smtpguard.policy import Policy
from smtpguard.policy.load import load_text
from smtpguard.policy.membership import facts_of, place

PATTERNS = Policy().interfaces.patterns
FIXTURES = Path(__file__).parent / "fixtures" / "pve"


class Static:
    """A source that knows a fixed set of interfaces."""

    name = "static"

    def __init__(self, known: dict[str, Identity]) -> None:
        self.known = known

    def start(self, on_change: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...
    def available(self) -> bool:
        return True

    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None:
        return self.known.get(ifname)


WEB = Identity(UUID, "web1", "libvirt", tenant="acme", uuid=UUID)


def test_a_hypervisor_source_names_the_vm_not_its_interface() -> None:
    """libvirt's vnetN is where the domain is; its id is the domain UUID, its
    name the domain's; an interface no source knows falls back to the name."""
    r = Resolver([Static({"vnet3": WEB})])
    v = r.identify(4, "vnet3", None, PATTERNS)
    assert v is not None and (v.vm, v.display, v.source, v.tenant) == (
        UUID, "web1", "libvirt", "acme")
    other = r.identify(5, "vnet4", None, PATTERNS)
    assert other is not None and (other.vm, other.source) == ("vnet4", "ifname")
    assert r.identify(6, "eth0", None, PATTERNS) is None  # not VM-facing


def test_the_ifalias_overrides_and_its_tenant_is_kept() -> None:
    r = Resolver([Static({"vnet3": WEB})])
    v = r.identify(4, "vnet3", "vm=db tenant=t2", PATTERNS)
    assert v is not None and (v.vm, v.source, v.tenant) == ("db", "ifalias", "t2")
    bare = Identity("x-uuid", "x", "libvirt")
    v = Resolver([Static({"vnet5": bare})]).identify(7, "vnet5", "tenant=t3", PATTERNS)
    assert v is not None and (v.vm, v.tenant) == ("x-uuid", "t3")


def test_proxmox_taps_map_through_their_configs() -> None:
    """tap<vmid>i<n> is named by /etc/pve's config (fixtures in its format)."""
    r = Resolver([ProxmoxSource(FIXTURES)])
    v = r.identify(9, "tap100i0", None, PATTERNS)
    assert v is not None and v.vm == "pve:100" and v.source == "proxmox"
    assert v.display != "100"


def test_the_hook_names_a_domains_taps_and_forgets_them_when_it_stops() -> None:
    """What libvirt's qemu hook hands over at `start` names the taps at once;
    a tap name given to another domain later belongs to that one only."""
    hook = HookSource()
    assert hook.announce("start", live()) == ["vnet0", "vnet1"]
    r = Resolver([hook])
    v = r.identify(3, "vnet0", None, PATTERNS)
    assert v is not None and v.vm == UUID and v.display == "sgx-explore1"
    other = "11111111-2222-3333-4444-555555555555"
    hook.announce("start", live(uuid=other).replace("vnet1", "vnet9"))
    now = hook.lookup("vnet0")
    assert now is not None and now.id == other
    assert hook.announce("stopped", live(uuid=other)) == ["vnet0", "vnet9"]
    assert hook.lookup("vnet0") is None


def test_members_match_the_new_facts_and_the_hypervisors_class_comes_after() -> None:
    """`vm` globs match the name too, `uuid` the domain UUID; a class from
    metadata applies when no rule matches and the policy has it."""
    pol = load_text(f"""version: 1
classes: {{default: {{}}, gold: {{}}, trusted: {{}}}}
members:
  - {{class: gold, vm: "web*"}}
  - {{class: gold, uuid: "{UUID.upper()}"}}
""")
    v = Resolver([Static({"vnet3": WEB})]).identify(4, "vnet3", None, PATTERNS)
    assert v is not None
    assert place(pol, facts_of(v.vm, [v])).rule == 0
    by_uuid = Identity(UUID, "db9", "libvirt", uuid=UUID)
    w = Resolver([Static({"vnet3": by_uuid})]).identify(4, "vnet3", None, PATTERNS)
    assert w is not None and place(pol, facts_of(w.vm, [w])).rule == 1
    hinted = Identity("u2", "db", "libvirt", cls="trusted")
    h = Resolver([Static({"vnet4": hinted})]).identify(5, "vnet4", None, PATTERNS)
    assert h is not None and place(pol, facts_of(h.vm, [h])).cls == "trusted"
    unknown = Identity("u3", "db", "libvirt", cls="nonesuch")
    u = Resolver([Static({"vnet5": unknown})]).identify(6, "vnet5", None, PATTERNS)
    assert u is not None and place(pol, facts_of(u.vm, [u])).cls == "default"
