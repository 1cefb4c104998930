"""Policy reloads (the file, SIGHUP, the fleet's) and the identity sources
the policy names, glued to the running agent."""

from __future__ import annotations

from smtpguard.daemon.state import AgentState
from smtpguard.errors import SmtpguardError
from smtpguard.inventory.resolve import Resolver
from smtpguard.policy import load_path


class Reloading(AgentState):
    """Swap a valid new policy in; restart the inventory when it changes."""

    def _fleet_policy_changed(self) -> None:  # on the fleet's thread
        self._reload.set()
        self._monitor.events.put(None)

    def reload(self) -> None:
        """Swap in the policy on disk (and the fleet's, from etcd) if it is
        valid; keep the running one if not."""
        docs, revision = self.fleet.policy_docs() if self.fleet is not None else ([], 0)
        try:
            loaded = load_path(self.cfg.policy_path, docs)
        except SmtpguardError as exc:
            self.reloads["rejected"] += 1
            self.log.error("policy.rejected", policy=self._policy_name(),
                           errors=str(exc).splitlines(), policy_generation=self.generation,
                           kept_digest=self.loaded.digest)
            return
        if self.keeper is not None and self.cfg.backend is None and \
                loaded.policy.enforcement.backend != self.policy.enforcement.backend:
            self.log.warning("enforce.backend_unchanged", running=self.keeper.enforcer.name,
                             requested=loaded.policy.enforcement.backend,
                             hint="the backend is chosen at start: restart to switch")
        if loaded.policy.fleet != self.policy.fleet:
            self.log.warning("fleet.unchanged", hint="the fleet section is read at start: "
                             "restart to join, leave or change it")
        inventory_changed = loaded.policy.inventory != self.policy.inventory
        self.loaded = loaded
        # With the fleet's policy: its etcd revision (the same on every host).
        self.generation = revision if revision > self.generation else self.generation + 1
        self.reloads["applied"] += 1
        if self.fleet is not None and docs:
            self.fleet.accepted(docs, revision)
        self._apply_datapath_policy()
        if inventory_changed:
            self._start_inventory()
        self.reconcile()
        if self.keeper is not None:
            self.keeper.policy_changed(self.policy, self.ifaces)
        if self.responder is not None:
            self.responder.configure(self.policy)
        self.log.info("policy.reloaded", policy=self._policy_name(), digest=loaded.digest,
                      policy_generation=self.generation, interfaces=len(self.ifaces))

    def _apply_datapath_policy(self) -> None:
        self.datapath.set_ports(self.policy.smtp_ports)
        self.datapath.set_no_answer(self.policy.datapath.no_answer_after)
        self.datapath.set_slot_offset(0)  # the kernel's clock as it is (tests move it)
        # Marked SYNs are rejected by the nftables tables' rule only (see
        # datapath/trip.py); with no such rule there is nothing to mark for.
        nft = self.keeper is not None and self.keeper.enforcer.name == "nftables"
        self.datapath.set_trip_mark(self.policy.datapath.trip_mark if nft else 0)
        if self.responder is not None:
            self.responder.trips = self.datapath.table("smtp_trip") if nft else None

    def _start_inventory(self) -> None:
        """The policy's identity sources (libvirt, Proxmox), started and given
        a few seconds to say what they know before the first dump."""
        from smtpguard.inventory.sources import from_policy

        self.resolver.stop()
        self.resolver = Resolver([self.hook, *from_policy(self.policy.inventory)])
        self.resolver.start(self._identities_changed)
        self.resolver.wait_settled(5.0)

    def _identities_changed(self) -> None:
        """From a source's thread: look every interface up again, soon."""
        self._reidentify.set()
        self._monitor.events.put(None)
