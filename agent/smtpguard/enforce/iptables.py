"""The iptables backend: our chains in the filter table of iptables-legacy and
ip6tables-legacy, through python-iptables (libiptc; iptc_table.py edits a
table, iptables_render.py says what the rules are, iptables_counts.py reads
their counts), and the VMs' blocks and throttles as elements of our ipsets
(ipset_state.py).

A block, throttle or release is an element added or deleted: the rules
that act on it are in every VM's chain already, so the table is not
replaced (a replace re-checks every rule in it: 30 ms per family at 1,000
VMs). A VM that comes, goes or changes class is one table replace per
family, which the kernel swaps in atomically: no packet sees a half-applied
change; a full apply has the kernel check one family's table in the
background while it builds the other's. Chains whose rules (by the
digest in their comments) are already right are not touched, and rules that
are rewritten take their predecessors' counters, so per-VM counts never go
back. Use it only where the host already runs iptables-legacy: creating
legacy tables on an nftables host slows every bridged packet (about 11%
measured) and cannot be undone without a reboot (see enforce/select.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

from smtpguard import logs
from smtpguard.enforce import iptables_render as R
from smtpguard.enforce import render
from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.enforce.ipset_state import IpsetState
from smtpguard.enforce.iptables_counts import hashlimit_fill, rejected
from smtpguard.enforce.iptables_kernel import (
    PROC,
    TABLE_NAMES,
    kernel_ready,
    legacy_tables_in_use,
    load_iptc,
)
from smtpguard.enforce.iptc_table import Model, XtTable
from smtpguard.enforce.nftables import BlockedCount
from smtpguard.errors import EnforcerError
from smtpguard.policy.model import Policy

__all__ = ["IptablesEnforcer", "kernel_ready", "legacy_tables_in_use"]  # select.py, tests

COUNTS_MAX_AGE = 1.0  # seconds a counter reading is reused


class IptablesEnforcer:
    """Idempotent like the nftables backend: apply() brings our chains to the
    desired state whatever the table holds, and adopts what is in force."""

    name = "iptables"
    # No netdev family: the bridge and IP hooks never see a VM on Open vSwitch
    # or behind a macvtap, so those are counted, never stopped (logged).
    reaches = frozenset({"bridge", "routed"})

    def __init__(self, policy: Policy | None = None, proc: Path = PROC) -> None:
        self.iptc = load_iptc()
        self._policy = policy  # set_action needs one: apply() sets it
        self.proc = proc
        # FORWARD/INPUT can always send a reset; bridged VMs are seen with br_netfilter.
        self.caps = Capabilities(reject_bridge=True, reject_inet=True)
        self._lock = threading.RLock()  # python-iptables' tables are process-wide
        self._model: dict[str, Model] | None = None
        self._classes: dict[str, str] | None = None  # interfaces with a chain -> class
        self._counts: tuple[float, list[BlockedCount]] | None = None
        self._nat_model: dict[str, Model] = {}  # family -> our nat chains, when redirecting
        self._bridge_seen: bool | None = None
        self._groups: dict[str, str] = {}  # ifname -> vm, for VMs with several interfaces
        self._actions: dict[str, Action] = {}  # what our sets hold, as we last wrote them
        self.sets = IpsetState()  # blocks and throttles: elements, not rules

    @classmethod
    def for_enforcing(cls) -> IptablesEnforcer:
        """The backend the agent enforces with: its kernel side checked first
        (cleanup and removal construct it without, so nothing is loaded)."""
        enf = cls()
        kernel_ready()
        return enf

    def _table(self, family: R.Family) -> XtTable:
        return XtTable(self.iptc, family)

    def _edit(self, ft: XtTable, have: Model, want: dict[str, list[R.Rule]],
              drop: set[str], hooks: list[R.Rule] | None, trusted: bool,
              after: XtTable | None = None, background: bool = False) -> Model:
        """One table replace: sync the chains in `want` (targets first, then
        the dispatch that jumps to them), delete the chains in `drop`, put our
        jumps first in the hooks. `have` is what we believe the chains hold.
        after, background: see XtTable.commit."""
        new = dict(have)
        retired: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            for chain, rules in want.items():
                if chain != R.DISPATCH:
                    owner = R.owner_of(chain) or R.UNKNOWN_IFACE
                    new[chain] = ft.sync_chain(chain, have.get(chain, []), rules,
                                               retired=retired.setdefault(owner, {}))
            if R.DISPATCH in want:
                new[R.DISPATCH] = ft.sync_chain(R.DISPATCH, have.get(R.DISPATCH, []),
                                                want[R.DISPATCH])
            gone = sorted(drop - {R.TALLY_CHAIN})
            for chain in gone:
                new.pop(chain, None)
            ft.drop_chains(gone)
            # A VM that goes takes its counts with it (as nftables forgets them).
            forget = {c[len(R.VM_CHAIN):] for c in drop if c.startswith(R.VM_CHAIN)}
            if ft.name == "filter":
                new[R.TALLY_CHAIN] = ft.tally(have.get(R.TALLY_CHAIN, []), retired, forget)
            for hook in ft.hooks if hooks is not None else ():
                assert hooks is not None
                mine = [r.comment(ft.family) for r in hooks]
                if trusted and hook in have and ft.jumps_first(hook, len(hooks)) \
                        and [c for c in have[hook] if R.parse_comment(c)] == mine:
                    continue
                new[hook] = ft.sync_chain(hook, ft.read_hook(hook), hooks, hook=True)
        except self.iptc.IPTCError as exc:
            raise EnforcerError(f"building the smtpguard {ft.family} chains: {exc}") from exc
        ft.commit(f"applying the smtpguard {ft.family} {ft.name} chains", after, background)
        return new

    def _has_table(self, family: R.Family, name: str) -> bool:
        path = self.proc / TABLE_NAMES[family]
        return path.exists() and name in path.read_text().split()

    def _nat(self, desired: Desired) -> None:
        """The nat table's SMTPG-NAT and its jump from PREROUTING while a
        class redirects; removed when none does. A nat table is never
        created for nothing."""
        for fam in R.FAMILIES:
            want = R.nat_rules(desired, fam)
            if not want and not self._has_table(fam, "nat"):
                self._nat_model.pop(fam, None)
                continue
            nt = XtTable(self.iptc, fam, "nat")
            have = nt.read()
            if not want and not have.get(R.NAT_CHAIN) and not any(
                    R.parse_comment(c) for h in R.NAT_HOOKS for c in have.get(h, [])):
                continue
            chains = {R.NAT_CHAIN: want} if want else {}
            drop = set() if want else {c for c in have if c.startswith(R.PREFIX)}
            self._nat_model[fam] = self._edit(nt, have, chains, drop,
                                              R.nat_hook_rules(desired.policy), trusted=False)
            if not want:
                self._nat_model.pop(fam, None)

    def _done(self, desired: Desired, model: dict[str, Model]) -> None:
        self._model = model
        self._actions = {n: a for n, a in desired.actions.items()
                         if n in R.set_state(desired)}
        self._policy = desired.policy
        self._classes = R.vm_ifaces(desired)
        self._check_bridge()

    # -- the backend interface ---------------------------------------------
    def apply(self, desired: Desired) -> None:
        """Full apply: read what the kernel holds (adopt it), fix what differs,
        prune what is ours but not wanted."""
        with self._lock:
            self._groups = dict(desired.groups)
            # The sets first: the rules refer to them, and a VM's chain is in
            # force from its first SYN with its block already in the set.
            self.sets.ensure()
            state = R.set_state(desired)
            held, odd = self.sets.state(self.sets.read())
            self.sets.write(state, (set(state) | set(held)) - odd, held)
            self.sets.write(state, odd)
            model: dict[str, Model] = {}
            # Each family's table is replaced before the next is built. (Replacing
            # one in a thread while python-iptables built the other crashed the
            # agent with SIGSEGV in the Debian 12 system test, 1 start in 2:
            # libxtables keeps process-wide state.)
            prev: XtTable | None = None
            try:
                for fam in R.FAMILIES:
                    ft = self._table(fam)
                    have = ft.read()
                    for chain in ft.unflagged:  # lost the flag (a restore): rewritten
                        have[chain] = [" ".join(c.split()[:2] + ["lost"]) for c in have[chain]]
                    want = R.chains(desired, fam)
                    drop = {c for c in have if c.startswith(R.PREFIX)} - set(want)
                    model[fam] = self._edit(ft, have, want, drop, R.hook_rules(desired.policy),
                                            trusted=False, after=prev, background=False)
                    prev = ft
            finally:
                if prev is not None:
                    prev.finish()
            self._nat(desired)
            self._done(desired, model)

    def _update(self, desired: Desired, touched: set[str]) -> None:
        """Only the chains of these interfaces (and the dispatch when the set
        of VM chains changes): the rest of the table is left as it is."""
        model = self._trusted()
        classes = R.vm_ifaces(desired)
        pol = desired.policy
        now = time.time()
        added = set(classes) - set(self._classes or {})
        gone = set(self._classes or {}) - set(classes)
        if added:
            self.sets.ensure()
        # Before the chains: a VM's block follows it to its new interface
        # before the chain that acts on it is there.
        self.sets.write(R.set_state(desired, now), touched | gone)
        for fam in R.FAMILIES:
            want: dict[str, list[R.Rule]] = {}
            for n in sorted(touched & set(classes)):
                want.update(R.vm_chains(n, classes[n], pol, fam, R.shared_owner(desired, n)))
            if added or gone:
                want[R.DISPATCH] = R.dispatch_rules(desired, fam)
            drop = {c for n in gone for c in (R.vm_chain(n), R.throttle_chain(n))}
            model[fam] = self._edit(self._table(fam), model[fam], want, drop, None,
                                    trusted=True)
        self._done(desired, model)

    def set_vms(self, desired: Desired) -> None:
        """VMs came, went or changed class: their chains and the dispatch."""
        with self._lock:
            self._trusted()
            # The caller's actions are the truth (the keeper's, rendered onto
            # the interfaces present): a name that left takes none along.
            before = self._classes or {}
            after = R.vm_ifaces(desired)
            regrouped = {n for n in set(self._groups) | set(desired.groups)
                         if self._groups.get(n) != desired.groups.get(n)}
            self._groups = dict(desired.groups)
            self._update(desired, {n for n in set(before) | set(after)
                                   if before.get(n) != after.get(n)} | regrouped)
            if self._nat_model or render.redirecting(desired.policy):
                self._nat(desired)  # who is redirected follows the VMs

    def set_action(self, ifnames: list[str], action: Action | None,
                   classes: dict[str, str] | None = None, default_class: str = "default"
                   ) -> None:
        """Block, throttle or release these interfaces: their elements in our
        sets, and their chains only where one comes, goes or changes class."""
        with self._lock:
            if self._policy is None:
                raise EnforcerError("no policy applied yet")
            self._trusted()
            actions = dict(self._actions)
            for n in ifnames:
                if action is None:
                    actions.pop(n, None)
                else:
                    actions[n] = action
            known = dict(self._classes or {})
            if classes is not None:  # the caller's view of which VMs exist wins
                known = {n: c for n, c in classes.items()}
            desired = Desired(self._policy, known, actions, self._groups)
            if R.vm_ifaces(desired) != self._classes:
                self._update(desired, set(ifnames))
            else:
                self.sets.write(R.set_state(desired), ifnames)
                self._actions = actions

    def actions(self) -> dict[str, Action]:
        """What our sets hold now (read from the kernel: an element deleted
        or added by hand shows, and verify() puts it right)."""
        with self._lock:
            state, _odd = self.sets.state(self.sets.read())
        return R.actions_of(state)

    def disagreeing(self) -> set[str]:
        """Interfaces whose elements differ between our sets (a family, or
        the routed or bridged element, lost by hand): verify() puts them right."""
        with self._lock:
            return self.sets.state(self.sets.read())[1]

    def _trusted(self) -> dict[str, Model]:
        """What our chains hold: what we last wrote, else read from the kernel."""
        if self._model is None:
            self._model = {fam: self._table(fam).read() for fam in R.FAMILIES}
            self._classes = {c[len(R.VM_CHAIN):]: "?" for c in self._model["ipv4"]
                             if c.startswith(R.VM_CHAIN)}
            self._actions = R.actions_of(self.sets.state(self.sets.read())[0])
        return self._model

    def _check_bridge(self) -> None:
        """Bridged VMs reach iptables only through br_netfilter: say so once
        when it is off in this namespace."""
        knob = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        seen = knob.exists() and knob.read_text().strip() == "1"
        if seen != self._bridge_seen:
            self._bridge_seen = seen
            if not seen:
                logs.get().warning("enforce.bridged_unseen", backend=self.name,
                                   hint="bridged VMs are enforced only with br_netfilter "
                                   "(sysctl net.bridge.bridge-nf-call-iptables=1); routed "
                                   "taps are enforced either way")

    def drift(self, desired: Desired) -> list[str]:
        """Families whose chains differ from what we last wrote (flushed,
        deleted, edited, or our jump no longer first)."""
        with self._lock:
            if self._model is None:
                return list(R.FAMILIES)
            out: list[str] = []
            for fam in R.FAMILIES:
                if not self._intact(fam, self._model[fam]) or (
                        fam in self._nat_model and not self._intact(
                            fam, self._nat_model[fam], "nat")):
                    out.append(fam)
            self._check_bridge()
            return out

    def _intact(self, family: R.Family, model: Model, table: str = "filter") -> bool:
        try:
            ft = XtTable(self.iptc, family, table)
        except EnforcerError:
            return False
        for chain, comments in model.items():
            if not ft.is_chain(chain):
                return False
            if chain in ft.hooks:
                if not ft.jumps_first(chain, len(
                        [c for c in comments if R.parse_comment(c)])):
                    return False
            elif chain.startswith(R.VM_CHAIN) and table == "filter":
                plain, by_port, n = ft.by_port_lookups(chain)
                if n != len(comments) or plain != by_port:  # or restored from saved
                    return False  # rules, which dropped the bridge-port lookups
            elif len(ft.counters(chain)) != len(comments):
                return False
        return True

    def blocked_counts(self) -> list[BlockedCount]:
        """Rejected attempts per (family, reason, interface, port), from the
        packet counters of our REJECT rules (read by position, no parsing).
        Reading them means copying the whole table out of the kernel (about
        100 ms at 1,000 VMs), so a reading is reused for up to COUNTS_MAX_AGE.
        Rules that never rejected give no count (nftables has none either)."""
        with self._lock:
            now = time.monotonic()
            if self._counts is not None and now - self._counts[0] < COUNTS_MAX_AGE:
                return self._counts[1]
            out = self._read_counts()
            self._counts = (now, out)
            return out

    def _read_counts(self) -> list[BlockedCount]:
        with self._lock:
            return rejected(self._table, self._trusted())

    def report(self) -> tuple[list[BlockedCount], dict[tuple[str, str], tuple[int, int]], int]:
        """Blocked counts, the fill of the per-source hashlimit of interfaces
        not seen yet, and no overflow counter: a full hashlimit table drops,
        so an attempt is never let through for lack of room. Read fresh (a
        scrape must not see a stale count)."""
        return self._read_counts(), hashlimit_fill(self.proc, self._policy), 0

    def forget(self, ifnames: Iterable[str]) -> None:
        """Nothing to do: a vanished VM's chain (and counters) goes with set_vms."""

    def remove(self) -> bool:
        """Delete our jumps and chains (enforcement off). Never creates a
        legacy table where none exists. True if there was anything."""
        if not legacy_tables_in_use(self.proc):
            return False
        existed = False
        with self._lock:
            for fam, name in [(f, t) for f in R.FAMILIES for t in ("filter", "nat")]:
                if not self._has_table(fam, name):
                    continue
                ft = XtTable(self.iptc, fam, name)
                changed = False
                for hook in ft.hooks:
                    comments = ft.read_hook(hook)
                    for i in reversed([i for i, c in enumerate(comments)
                                       if R.parse_comment(c)]):
                        ft.delete_at(hook, i)
                        changed = True
                ours = [c.name for c in ft.table.chains if c.name.startswith(R.PREFIX)]
                for chain in ours:  # emptied first: they jump to each other
                    ft.table.flush_entries(chain)
                for chain in ours:
                    ft.table.delete_chain(chain)
                    changed = True
                if changed:  # an unchanged table is not replaced
                    ft.commit(f"removing the smtpguard {fam} {name} chains")
                existed |= changed
            self._model = None
            self._nat_model = {}
            existed |= self.sets.destroy()  # the rules that used them are gone
        return existed
