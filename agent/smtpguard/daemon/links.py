"""The agent's interfaces: the classifier attached where the policy says,
detached elsewhere, put back when removed behind our back; the VMs' state
handed to the keeper as their interfaces come and go."""

from __future__ import annotations

import queue
from dataclasses import replace
from typing import Any, cast

from smtpguard.daemon.state import AgentState
from smtpguard.datapath import attach, linkdump
from smtpguard.datapath.attachment import Attachment, attachment, swapped
from smtpguard.datapath.interfaces import LinkEvent, dump_links
from smtpguard.errors import AttachError, SmtpguardError
from smtpguard.inventory.hook import START_OPS, domxml_uuid
from smtpguard.policy.membership import facts_of, place

FILTER_CHECK = 10.0  # how often the filters enforcement depends on are checked


class Links(AgentState):
    """Link events in, attachments and the interfaces map out."""

    def _enforce_vms(self) -> None:
        if self.fleet is not None:
            # A VM new here: its fleet record read and held before its interface is.
            self.fleet.arrive(v.vm for v in self.ifaces.values())
        if self.keeper is None:
            return
        try:
            self.keeper.ifaces_changed(self.ifaces)
            self.keeper.flush()
        except SmtpguardError as exc:
            # The interface is still covered by the default class (wildcards).
            self.log.error("enforce.update_failed", error=str(exc))

    def announce(self, op: str, xml: str) -> dict[str, Any]:
        """libvirt's hook (on the main loop): name the domain's taps now and
        put its state on them before the hook returns and QEMU starts."""
        taps = self.hook.announce(op, xml)
        if self.fleet is not None and op in START_OPS:
            # Incoming migration (`migrate`, before its taps exist), `prepare`,
            # `start`: the VM's record is read now, before QEMU runs.
            self.fleet.arrive([domxml_uuid(xml)] if domxml_uuid(xml) else [], expect=True)
        self._drain_links()
        present = {link.name: link for link in linkdump.dump()}
        for t in taps:
            if t in present:
                link = present[t]
                self.on_link(LinkEvent("new", link.index, t, link.alias, link.master, link.kind))
        self._enforce_vms()
        vifs = [v for v in self.ifaces.values() if v.ifname in taps]
        return {"ok": True, "interfaces": sorted(v.ifname for v in vifs),
                "vm": vifs[0].vm if vifs else None,
                "state": self.detector.record(vifs[0].vm).state
                if vifs and self.detector is not None else None}

    def _drain_links(self) -> None:
        """Handle the link events already queued (a burst; a tap's NEWLINK)."""
        while True:
            try:
                ev = self._monitor.events.get_nowait()
            except queue.Empty:
                return
            if ev is not None:
                self.on_link(ev)

    def reconcile(self) -> None:
        """Match the kernel to the interfaces now present: attach where the
        policy says, detach our filters elsewhere, forget what vanished."""
        links = dump_links()
        present = {ev.ifindex for ev in links}
        # Masters first: a tap's attachment is its master's kind.
        self._link_kinds = {ev.ifindex: ev.link_kind for ev in links}
        for ev in links:
            self.on_link(ev)
        gone = set(self.ifaces) - present
        for ifindex in gone:
            self._drop(ifindex, "vanished")
        # Counters of interfaces that vanished while no agent ran (keys only:
        # no need to decode every sketch here).
        try:
            known = {k.ifindex for k in self.datapath.table("smtp_stats").keys()}
            known |= {k.value for k in self.datapath.table("smtp_dests").keys()}
            self._forget |= known - present
        except Exception:
            self.log.debug("agent.snapshot_failed", exc_info=True)

    def on_link(self, ev: LinkEvent) -> None:
        if ev.kind == "del":
            self._link_kinds.pop(ev.ifindex, None)
            self.unattached.discard(ev.ifindex)
            if ev.ifindex in self.ifaces:
                self._drop(ev.ifindex, "vanished")
            return
        self._link_kinds[ev.ifindex] = ev.link_kind
        pats = self.policy.interfaces
        vif = self.resolver.identify(ev.ifindex, ev.ifname, ev.ifalias, pats.patterns,
                                     pats.vm_from_ifalias)
        if vif is not None:
            said = next((p.attachment for p in pats.patterns if p.pattern == vif.pattern),
                        "auto")
            vif = replace(vif, attachment=self._attachment(ev) if said == "auto"
                          else cast(Attachment, said))
        known = self.ifaces.get(ev.ifindex)
        if vif is None:
            if known is not None or attach.ours(self._ipr, ev.ifindex):
                self._detach(ev.ifindex, ev.ifname)
                if known is not None:
                    self._drop(ev.ifindex, "no longer matches")
            return
        if known == vif:
            return
        log = self.log.bind(vm=vif.vm, interface=vif.ifname)
        try:
            attach.attach(self._ipr, vif.ifindex, vif.ifname, self.datapath.ingress_fd,
                          self.datapath.egress_fd, swapped(vif.attachment))
        except AttachError as exc:
            # One interface's failure never stops the others.
            log.error("iface.attach_failed", error=str(exc))
            self.unattached.add(vif.ifindex)
            return
        self.unattached.discard(vif.ifindex)
        self.ifaces = {**self.ifaces, vif.ifindex: vif}
        self.names[vif.vm] = vif.display
        placed = place(self.policy, facts_of(vif.vm, [vif]))
        log.info("iface.attached", ifindex=vif.ifindex, pattern=vif.pattern,
                 attachment=vif.attachment,
                 renamed=known is not None, tenant=vif.tenant, vm_class=placed.cls,
                 name=vif.display, source=vif.source, uuid=vif.uuid,
                 previous_vm=None if known is None or known.vm == vif.vm else known.vm)

    def _attachment(self, ev: LinkEvent) -> Attachment:
        """How the device is plugged in, from its kind and its master's."""
        if not ev.master:
            return attachment(ev.link_kind, None)
        if ev.master not in self._link_kinds:  # a master we have not heard of yet
            self._link_kinds.update((link.index, link.kind) for link in linkdump.dump())
        return attachment(ev.link_kind, self._link_kinds.get(ev.master, ""))

    def _detach(self, ifindex: int, ifname: str) -> None:
        try:
            attach.detach(self._ipr, ifindex, ifname)
        except AttachError as exc:
            self.log.error("iface.detach_failed", interface=ifname, error=str(exc))

    def _drop(self, ifindex: int, reason: str) -> None:
        self.unattached.discard(ifindex)
        vif = self.ifaces.get(ifindex)
        self.ifaces = {k: v for k, v in self.ifaces.items() if k != ifindex}
        self._forget.add(ifindex)
        self._last_logged.pop(ifindex, None)
        if vif is not None:
            self.log.info("iface.detached", vm=vif.vm, interface=vif.ifname, reason=reason)

    def _check_filters(self) -> None:
        """Every 10 s, put back the classifier where enforcement needs it: on
        a macvtap the netdev table only marks what it refuses and the
        classifier drops it (enforce/render.py), so a filter deleted behind
        our back would let the VM through while status says blocked."""
        if self.clock() < self._next_filter_check or self._ipr is None:
            return
        self._next_filter_check = self.clock() + FILTER_CHECK
        for vif in list(self.ifaces.values()):
            if not swapped(vif.attachment):
                continue
            if attach.ours(self._ipr, vif.ifindex) == {"ingress", "egress"}:
                continue
            try:
                attach.attach(self._ipr, vif.ifindex, vif.ifname, self.datapath.ingress_fd,
                              self.datapath.egress_fd, True)
            except AttachError as exc:
                self.log.error("iface.attach_failed", vm=vif.vm, interface=vif.ifname,
                               error=str(exc))
                continue
            self.log.warning("iface.repaired", vm=vif.vm, interface=vif.ifname,
                             attachment=vif.attachment,
                             hint="our tc filter was removed behind our back; put back")

    def _sweep(self) -> None:
        if not self._forget:
            return
        doomed, self._forget = self._forget, set()
        doomed -= set(self.ifaces)
        removed = self.datapath.forget(doomed)
        self.log.debug("datapath.forgotten", interfaces=sorted(doomed), entries=removed)
