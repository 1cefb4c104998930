"""Parsing libvirt domain XML into interface -> Identity: pure, no libvirtd.

The documents below are what libvirt 9.0 (Debian 12) printed for a test domain
(`virsh dumpxml`, live and --inactive), trimmed of devices that do not matter."""

from __future__ import annotations

import pytest

from smtpguard.inventory import domxml
from smtpguard.inventory.identity import Identity

UUID = "7718c0bd-6441-4516-b10c-738483efebb9"

OURS = """\
    <smtpguard:vm xmlns:smtpguard="https://smtpguard.dev/xmlns/libvirt/1">
      <smtpguard:tenant>acme</smtpguard:tenant>
      <smtpguard:class>trusted</smtpguard:class>
    </smtpguard:vm>
"""
OTHER = """\
    <other:thing xmlns:other="http://example.org/other">
      <other:tenant>nope</other:tenant>
      <other:class>nope</other:class>
    </other:thing>
"""


def live(metadata: str | None = OURS + OTHER, uuid: str = UUID) -> str:
    meta = "" if metadata is None else f"  <metadata>\n{metadata}  </metadata>\n"
    return f"""\
<domain type='qemu' id='1'>
  <name>sgx-explore1</name>
  <uuid>{uuid}</uuid>
{meta}  <memory unit='KiB'>65536</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pci-root'>
      <alias name='pci.0'/>
    </controller>
    <interface type='bridge'>
      <mac address='52:54:00:82:0d:06'/>
      <source bridge='sgxbr0'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:AB:CD:EF'/>
      <source bridge='sgxbr0'/>
      <target dev='vnet1'/>
      <model type='e1000'/>
      <alias name='net1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <memballoon model='virtio'>
      <alias name='balloon0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
  </seclabel>
</domain>
"""


INACTIVE = f"""\
<domain type='qemu'>
  <name>sgx-explore1</name>
  <uuid>{UUID}</uuid>
  <metadata>
{OURS}  </metadata>
  <memory unit='KiB'>65536</memory>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:82:0d:06'/>
      <source bridge='sgxbr0'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </interface>
  </devices>
</domain>
"""


def test_each_nic_maps_its_tap_to_the_domain() -> None:
    """Every interface with a target dev names the domain by UUID, with its own MAC."""
    got = domxml.interfaces(live())
    assert set(got) == {"vnet0", "vnet1"}
    assert got["vnet0"] == Identity(
        id=UUID, name="sgx-explore1", source="libvirt", tenant="acme", cls="trusted",
        uuid=UUID, facts={"domain": "sgx-explore1", "uuid": UUID, "mac": "52:54:00:82:0d:06"})
    assert got["vnet1"].id == UUID
    assert got["vnet1"].facts["mac"] == "52:54:00:ab:cd:ef"


def test_uuid_is_lowercased() -> None:
    """The id is the canonical lowercase UUID, whatever case the XML used."""
    got = domxml.interfaces(live(uuid=UUID.upper()))
    assert {i.id for i in got.values()} == {UUID}
    assert got["vnet0"].facts["uuid"] == UUID


def test_inactive_xml_has_no_interfaces() -> None:
    """Inactive XML (no target dev) names no interface: nothing is guessed."""
    assert domxml.interfaces(INACTIVE) == {}
    assert not domxml.is_running(INACTIVE)
    assert domxml.is_running(live())


def test_without_metadata_tenant_and_class_are_none() -> None:
    got = domxml.interfaces(live(metadata=None))["vnet0"]
    assert (got.tenant, got.cls) == (None, None)
    assert got.name == "sgx-explore1"


def test_other_namespaces_are_not_read() -> None:
    """Another tool's <tenant> in its own namespace is not ours."""
    got = domxml.interfaces(live(metadata=OTHER))["vnet0"]
    assert (got.tenant, got.cls) == (None, None)


@pytest.mark.parametrize(("tenant", "cls", "want"), [
    ("acme corp", "trusted", (None, "trusted")),
    ("-acme", "<x>", (None, None)),
    ("a" * 64, "b" * 63, (None, "b" * 63)),
    ("", "", (None, None)),
    ("  acme\n  ", "user@example.org", ("acme", "user@example.org")),
    ("t:1.2_3-4", "x", ("t:1.2_3-4", "x")),
])
def test_invalid_metadata_values_are_ignored(tenant: str, cls: str,
                                             want: tuple[str | None, str | None]) -> None:
    """A value that is not a name is dropped; the other one still counts."""
    meta = (f'<smtpguard:vm xmlns:smtpguard="{domxml.NAMESPACE}">'
            f"<smtpguard:tenant>{tenant.replace('<', '&lt;').replace('>', '&gt;')}"
            f"</smtpguard:tenant><smtpguard:class>{cls.replace('<', '&lt;')}</smtpguard:class>"
            "</smtpguard:vm>\n")
    got = domxml.interfaces(live(metadata=meta))["vnet0"]
    assert (got.tenant, got.cls) == want


def test_metadata_with_one_child_only() -> None:
    meta = (f'<sg:vm xmlns:sg="{domxml.NAMESPACE}"><sg:class>bulk</sg:class></sg:vm>\n')
    got = domxml.interfaces(live(metadata=meta))["vnet1"]
    assert (got.tenant, got.cls) == (None, "bulk")


def test_metadata_xml_round_trips() -> None:
    """What metadata_xml() writes, interfaces() reads back (any prefix is fine)."""
    for tenant, cls in (("acme", "trusted"), ("acme", None), (None, "bulk"), (None, None)):
        got = domxml.interfaces(live(metadata=domxml.metadata_xml(tenant, cls) + "\n"))
        assert (got["vnet0"].tenant, got["vnet0"].cls) == (tenant, cls)
    assert domxml.metadata_xml("acme", "trusted") == (
        '<smtpguard:vm xmlns:smtpguard="https://smtpguard.dev/xmlns/libvirt/1">'
        "<smtpguard:tenant>acme</smtpguard:tenant><smtpguard:class>trusted</smtpguard:class>"
        "</smtpguard:vm>")
    with pytest.raises(ValueError, match="tenant"):
        domxml.metadata_xml("not a name")


def test_interface_without_mac_has_no_mac_fact() -> None:
    xml = live().replace("<mac address='52:54:00:82:0d:06'/>", "")
    got = domxml.interfaces(xml)
    assert "mac" not in got["vnet0"].facts
    assert got["vnet1"].facts["mac"] == "52:54:00:ab:cd:ef"


def test_tap_mac_is_the_guest_mac_with_fe() -> None:
    """libvirt sets a tap's MAC to the guest's with the first octet fe."""
    assert domxml.tap_mac("52:54:00:AB:CD:EF") == "fe:54:00:ab:cd:ef"


@pytest.mark.parametrize("bad", [
    "", "<domain", "<network><name>x</name></network>",
    "<domain><name>x</name></domain>",
    "<domain><name>x</name><uuid>not-a-uuid</uuid></domain>",
])
def test_malformed_xml_raises_domain_xml_error(bad: str) -> None:
    with pytest.raises(domxml.DomainXmlError):
        domxml.interfaces(bad)


def test_a_doctype_is_refused_not_expanded() -> None:
    """XML on the hook's stdin cannot make us expand entities."""
    bomb = ('<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            f"<domain><name>&b;</name><uuid>{UUID}</uuid></domain>")
    with pytest.raises(domxml.DomainXmlError, match="DOCTYPE"):
        domxml.interfaces(bomb)


def with_nics(nics: str, running: bool = True) -> str:
    """A domain (with our metadata) whose <devices> are these interfaces."""
    ident = " id='3'" if running else ""
    return (f"<domain type='kvm'{ident}><name>edge1</name><uuid>{UUID.upper()}</uuid>"
            f"<metadata>{OURS}</metadata><devices>{nics}</devices></domain>")


MACVTAP = """\
    <interface type='direct'>
      <mac address='52:54:00:5a:0b:01'/>
      <source dev='eth0' mode='bridge'/>
      <target dev='macvtap0'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
"""
VHOSTUSER = """\
    <interface type='vhostuser'>
      <mac address='52:54:00:5a:0b:02'/>
      <source type='unix' path='/var/run/openvswitch/vhu3f0c' mode='server'/>
      <model type='virtio'/>
    </interface>
"""
HOSTDEV = """\
    <interface type='hostdev' managed='yes'>
      <mac address='52:54:00:5A:0B:03'/>
      <source>
        <address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x2'/>
      </source>
    </interface>
"""
HOSTDEV_NO_ADDRESS = """\
    <interface type='hostdev'>
      <mac address='52:54:00:5A:0B:04'/>
    </interface>
"""
VDPA = """\
    <interface type='vdpa'>
      <mac address='52:54:00:5a:0b:05'/>
      <source dev='/dev/vhost-vdpa-0'/>
    </interface>
"""
PASSTHROUGH = """\
    <interface type='direct'>
      <mac address='52:54:00:5a:0b:06'/>
      <source dev='ens1f0v2' mode='passthrough'/>
      <target dev='macvtap1'/>
    </interface>
"""


@pytest.mark.parametrize("mode", ["bridge", "vepa", "private"])
def test_macvtap_in_a_shared_mode_is_a_covered_interface(mode: str) -> None:
    """A macvtap (bridge, vepa, private) crosses the host kernel: its target
    dev names the domain like a tap, and it is not uncovered."""
    xml = with_nics(MACVTAP.replace("mode='bridge'", f"mode='{mode}'"))
    got = domxml.interfaces(xml)
    assert set(got) == {"macvtap0"}
    assert (got["macvtap0"].id, got["macvtap0"].name, got["macvtap0"].tenant) == (
        UUID, "edge1", "acme")
    assert got["macvtap0"].facts["mac"] == "52:54:00:5a:0b:01"
    assert domxml.uncovered(xml) == []


def test_each_bypassing_interface_is_uncovered_once() -> None:
    """vhost-user, hostdev and vDPA each give one entry, in document order,
    with what identifies the interface; ordinary NICs none, and a macvtap in
    passthrough mode none (its frames cross the host kernel: covered)."""
    xml = with_nics(MACVTAP + VHOSTUSER + HOSTDEV + HOSTDEV_NO_ADDRESS + VDPA + PASSTHROUGH)
    got = domxml.uncovered(xml)
    assert [(u.reason, u.detail) for u in got] == [
        ("vhost-user", "/var/run/openvswitch/vhu3f0c"),
        ("hostdev", "0000:03:10.2"),
        ("hostdev", "52:54:00:5a:0b:04"),
        ("vdpa", "/dev/vhost-vdpa-0"),
    ]
    assert set(domxml.interfaces(with_nics(PASSTHROUGH))) == {"macvtap1"}
    assert {(u.vm, u.name, u.tenant, u.source) for u in got} == {
        (UUID, "edge1", "acme", "libvirt")}
    assert domxml.uncovered(live()) == []


def test_uncovered_reads_inactive_xml() -> None:
    """A defined domain that is not running is reported too (no target dev
    needed), while it names no interface."""
    xml = with_nics(VHOSTUSER + HOSTDEV + PASSTHROUGH.replace("<target dev='macvtap1'/>", ""),
                    running=False)
    assert [u.reason for u in domxml.uncovered(xml)] == ["vhost-user", "hostdev"]
    assert domxml.interfaces(xml) == {}
    assert domxml.uncovered(INACTIVE) == []


def test_uncovered_refuses_what_interfaces_refuses() -> None:
    with pytest.raises(domxml.DomainXmlError):
        domxml.uncovered("<domain><name>x</name></domain>")
