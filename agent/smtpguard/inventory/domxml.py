"""Which VM a libvirt domain XML puts on which host interface (pure parsing).

A running domain's XML (`virsh dumpxml`, `XMLDesc(0)`, or the document
libvirt's qemu hook reads on stdin) names, for every `<devices><interface>`,
the host device it got (`<target dev='vnet3'/>`, a macvtap's `macvtap0`) and
the guest's MAC. Inactive XML has no target devs; those interfaces are skipped.

Some interfaces never cross the host kernel: `vhostuser` (a DPDK switch reads
the guest's rings), `hostdev` (an SR-IOV VF given to the guest) and `vdpa`.
uncovered() lists them, from live or inactive XML alike. A `direct` interface
is a macvtap in every mode, `passthrough` included (the macvtap takes the
whole lower device, but the guest's frames still go through it in the host
kernel): it is covered like any macvtap. An interface on a libvirt `<network>` shows its
real type only in live XML, so a stopped domain's network interface whose pool
hands out VFs is known only once it runs.

The operator may give a VM a tenant and a class in the domain's `<metadata>`,
in smtpguard's own XML namespace:

    <metadata>
      <smtpguard:vm xmlns:smtpguard="https://smtpguard.dev/xmlns/libvirt/1">
        <smtpguard:tenant>acme</smtpguard:tenant>
        <smtpguard:class>trusted</smtpguard:class>
      </smtpguard:vm>
    </metadata>

Both children are optional; a value must look like a name
(`[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}`), anything else is ignored. Set it on a
defined domain with
`virsh metadata DOMAIN https://smtpguard.dev/xmlns/libvirt/1 --key smtpguard
--set '<vm><tenant>acme</tenant><class>trusted</class></vm>' --config --live`,
or write `metadata_xml()`'s element into the domain XML.

libvirtd is root's, but the hook path reads XML from stdin, so documents with
a DOCTYPE (which libvirt never writes) are refused rather than expanded.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from ..errors import SmtpguardError
from .identity import Identity, Uncovered

NAMESPACE = "https://smtpguard.dev/xmlns/libvirt/1"
PREFIX = "smtpguard"
SOURCE = "libvirt"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}")
_NS = f"{{{NAMESPACE}}}"


class DomainXmlError(SmtpguardError):
    """A libvirt domain XML is malformed or lacks what names the VM."""


class _NoDoctype(ET.TreeBuilder):
    """A tree builder that refuses DTDs (so no entity is ever expanded)."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise DomainXmlError("domain XML with a DOCTYPE refused")


def _parse(xml: str) -> ET.Element:
    parser = ET.XMLParser(target=_NoDoctype())
    try:
        parser.feed(xml)
        root = parser.close()
    except ET.ParseError as exc:
        raise DomainXmlError(f"domain XML does not parse: {exc}") from exc
    if root.tag != "domain":
        raise DomainXmlError(f"not a domain XML (root <{root.tag}>)")
    return root


def valid_name(value: str | None) -> str | None:
    """value stripped if it is a valid tenant/class name, else None."""
    if value is None:
        return None
    value = value.strip()
    return value if _NAME.fullmatch(value) else None


def metadata(root: ET.Element) -> tuple[str | None, str | None]:
    """(tenant, class) from a parsed domain's smtpguard metadata, if valid."""
    vm = root.find(f"metadata/{_NS}vm")
    if vm is None:
        return None, None
    return valid_name(vm.findtext(f"{_NS}tenant")), valid_name(vm.findtext(f"{_NS}class"))


def _name_uuid(root: ET.Element) -> tuple[str, str]:
    """(name, canonical lowercase UUID) of a parsed domain."""
    name = (root.findtext("name") or "").strip()
    raw_uuid = (root.findtext("uuid") or "").strip()
    if not name or not raw_uuid:
        raise DomainXmlError("domain XML without <name> or <uuid>")
    try:
        return name, str(uuidlib.UUID(raw_uuid))
    except ValueError as exc:
        raise DomainXmlError(f"domain {name}: bad <uuid> {raw_uuid!r}") from exc


def interfaces(xml: str) -> dict[str, Identity]:
    """Each interface's host device name -> the domain's Identity.

    facts hold the domain name, its UUID and that interface's guest MAC."""
    root = _parse(xml)
    name, uuid = _name_uuid(root)
    tenant, cls = metadata(root)
    found: dict[str, Identity] = {}
    for nic in root.iterfind("devices/interface"):
        target = nic.find("target")
        dev = (target.get("dev") or "").strip() if target is not None else ""
        if not dev:
            continue
        facts = {"domain": name, "uuid": uuid}
        mac_el = nic.find("mac")
        mac = (mac_el.get("address") or "").strip().lower() if mac_el is not None else ""
        if mac:
            facts["mac"] = mac
        found[dev] = Identity(id=uuid, name=name, source=SOURCE, tenant=tenant, cls=cls,
                              uuid=uuid, facts=facts)
    return found


def uncovered(xml: str) -> list[Uncovered]:
    """The domain's interfaces whose traffic bypasses the host kernel, one
    entry each, in document order (live or inactive XML)."""
    root = _parse(xml)
    name, uuid = _name_uuid(root)
    tenant, _cls = metadata(root)
    found: list[Uncovered] = []
    for nic in root.iterfind("devices/interface"):
        why = _bypass(nic)
        if why is not None:
            found.append(Uncovered(vm=uuid, name=name, reason=why[0], source=SOURCE,
                                   tenant=tenant, detail=why[1]))
    return found


def _bypass(nic: ET.Element) -> tuple[str, str] | None:
    """(reason, detail) when this <interface> never crosses the host kernel."""
    kind = nic.get("type")
    src = nic.find("source")
    if kind == "vhostuser":
        return "vhost-user", _attr(src, "path")
    if kind == "hostdev":
        addr = src.find("address") if src is not None else None
        return "hostdev", _pci(addr) or _attr(nic.find("mac"), "address").lower()
    if kind == "vdpa":
        return "vdpa", _attr(src, "dev")
    return None


def _attr(el: ET.Element | None, key: str) -> str:
    return (el.get(key) or "").strip() if el is not None else ""


def _pci(addr: ET.Element | None) -> str:
    """A libvirt PCI <address> as 0000:03:10.2 ("" if it is not one)."""
    if addr is None or addr.get("type", "pci") != "pci" or addr.get("bus") is None:
        return ""
    try:
        dom, bus, slot, fn = (int(addr.get(k) or "0", 0)
                              for k in ("domain", "bus", "slot", "function"))
    except ValueError:
        return ""
    return f"{dom:04x}:{bus:02x}:{slot:02x}.{fn:x}"


def is_running(xml: str) -> bool:
    """Whether the XML describes a running domain (libvirt writes `id=` then)."""
    return _parse(xml).get("id") is not None


def metadata_xml(tenant: str | None = None, cls: str | None = None) -> str:
    """smtpguard's `<metadata>` child for a domain XML, with the values given.

    Raises ValueError for a value that is not a valid name (it would be ignored)."""
    parts = [f'<{PREFIX}:vm xmlns:{PREFIX}="{NAMESPACE}">']
    for tag, value in (("tenant", tenant), ("class", cls)):
        if value is None:
            continue
        if valid_name(value) != value:
            raise ValueError(f"invalid {tag} {value!r}")
        parts.append(f"<{PREFIX}:{tag}>{escape(value)}</{PREFIX}:{tag}>")
    parts.append(f"</{PREFIX}:vm>")
    return "".join(parts)


def tap_mac(guest_mac: str) -> str:
    """The MAC libvirt gives a tap: the guest's with the first octet fe."""
    return "fe" + guest_mac.lower()[2:]
