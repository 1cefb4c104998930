"""One table (filter, or nat for redirects) of one family through
python-iptables (libiptc): reading our chains, editing them by position while
keeping counters, committing.

Nothing here decides what the rules should be (iptables_render does) or when
to change them (the backend, iptables.py). Every XtTable is a fresh read of
the kernel's table; commit() replaces it in one step, in the background if
asked (the next family's table is built meanwhile). Rules go to libiptc as
the bytes of their entries (iptc_raw), python-iptables builds only the first
of each shape; a chain that is new is written in order, without a diff.
"""

from __future__ import annotations

import difflib
import struct
import threading
from typing import Any

from smtpguard.enforce import ipset_state, render
from smtpguard.enforce import iptables_render as R
from smtpguard.enforce import iptc_raw as X
from smtpguard.errors import EnforcerError

Model = dict[str, list[str]]  # chain -> the comments of its rules, in order


class XtTable:
    def __init__(self, iptc: Any, family: R.Family, name: str = "filter") -> None:
        self.iptc = iptc
        self.family = family
        self.name = name
        self.hooks = R.HOOKS if name == "filter" else R.NAT_HOOKS
        self.entry = R.DISPATCH if name == "filter" else R.NAT_CHAIN  # what hooks jump to
        table = iptc.Table(name) if family == "ipv4" else iptc.Table6(name)
        table.autocommit = False
        try:
            table.refresh()  # python-iptables' tables are process-wide: re-read
        except iptc.IPTCError as exc:
            raise EnforcerError(f"reading the {family} {name} table: {exc}") from exc
        self.table = table
        # raw entries by shape (iptc_raw), kept per table edit: a set match
        # holds the set's index in this namespace, as it was when built.
        self.templates: dict[R.Rule, X.Template] = {}
        # The same by id (hashing a rule costs more than filling a template):
        # the rule is kept alive beside it.
        self.by_id: dict[int, tuple[R.Rule, X.Template]] = {}
        self.made: dict[int, tuple[R.Rule, bytes]] = {}  # rules in many chains, made once
        self.entry_type = iptc.ip4tc.ipt_entry if family == "ipv4" else iptc.ip6tc.ip6t_entry
        self.lib = table._iptc  # libiptc itself: a rule's bytes go in as they are
        self._pending: threading.Thread | None = None  # a background commit
        self._failed: EnforcerError | None = None

    def is_chain(self, chain: str) -> bool:
        return bool(self.table.is_chain(chain))

    def drop_chains(self, chains: list[str]) -> None:
        """Delete these chains, all emptied first (they may jump to each other)."""
        there = [c for c in chains if self.table.is_chain(c)]
        for chain in there:
            self.table.flush_entries(chain)
        for chain in there:
            self.table.delete_chain(chain)

    def new_rule(self, spec: R.Rule) -> bytes:
        """The rule's entry (struct ipt_entry/ip6t_entry with its matches and target)."""
        made = self.made.get(id(spec))
        if made is not None:
            return made[1]
        shape = X.shape(spec)
        if shape is None:
            return bytes(self._build(spec).rule)
        got = self.by_id.get(id(shape))
        if got is None:
            template = self.templates.get(shape)
            if template is None:  # the first of its shape, built for real
                template = self.templates[shape] = X.Template(
                    bytes(self._build(spec).rule), self.family, self.entry_type)
            got = self.by_id[id(shape)] = (shape, template)
        raw = got[1].fill(spec)
        if not X.per_vm(spec):
            self.made[id(spec)] = (spec, raw)
        return raw

    def with_counters(self, raw: bytes, counters: tuple[int, int]) -> bytes:
        at = self.entry_type.counters.offset
        return b"".join((raw[:at], struct.pack("=QQ", *counters), raw[at + 16:]))

    def _append(self, chain: bytes, raw: bytes) -> None:
        if self.lib.iptc_append_entry(chain, raw, self.table._handle) != 1:
            raise self.iptc.IPTCError(f"can't append a rule to {chain.decode()}: "
                                      f"{self.table.strerror()}")

    def _insert(self, chain: bytes, raw: bytes, at: int) -> None:
        if self.lib.iptc_insert_entry(chain, raw, at, self.table._handle) != 1:
            raise self.iptc.IPTCError(f"can't insert a rule into {chain.decode()}: "
                                      f"{self.table.strerror()}")

    def _build(self, spec: R.Rule) -> Any:
        iptc = self.iptc
        r = iptc.Rule() if self.family == "ipv4" else iptc.Rule6()
        if spec.iface:
            r.in_interface = spec.iface
        if spec.dst:
            r.dst = spec.dst
        if spec.syn_ports or spec.dport is not None:
            r.protocol = "tcp"
            m = r.create_match("tcp")
            if spec.syn_ports:
                m.tcp_flags = ["FIN,SYN,RST,ACK", "SYN"]
                r.create_match("multiport").dports = ",".join(map(str, spec.syn_ports))
            else:
                m.dport = str(spec.dport)
        if spec.physdev:
            r.create_match("physdev").physdev_in = spec.physdev
        if spec.not_dnat:
            r.create_match("conntrack").ctstate = "!DNAT"
        if spec.until is not None:
            r.create_match("time").datestop = R.datestop(spec.until)
        if spec.state:  # before the hashlimit: a bucket sees only what is in the state
            m = r.create_match("set")
            m.match_set = [ipset_state.set_name(spec.state, self.family), "src,src"]
            if spec.by_port:
                X.by_bridge_port(m)
        if spec.limit:
            lim = spec.limit
            m = r.create_match("hashlimit")
            m.hashlimit_above = lim.rate
            m.hashlimit_burst = str(lim.burst)
            m.hashlimit_name = lim.name
            if lim.per_source:
                m.hashlimit_mode = "srcip"
                m.hashlimit_srcmask = str(R.SRC_MASK[self.family])
            m.hashlimit_htable_size = str(lim.size)
            m.hashlimit_htable_max = str(lim.max)
            # python-iptables leaves it 0 otherwise, which the kernel refuses
            m.hashlimit_htable_expire = str(render.LIMITER_IDLE * 1000)
        r.create_match("comment").comment = spec.comment(self.family)
        if spec.target == "REJECT":
            r.create_target("REJECT").reject_with = "tcp-reset"
        elif spec.target == "DNAT":
            r.create_target("DNAT").to_destination = spec.to
        elif spec.target == "RETURN":
            r.create_target("RETURN")
        else:
            r.target = iptc.Target(r, spec.target, goto=spec.goto)
        return r

    @staticmethod
    def comment(rule: Any) -> str:
        for m in rule.matches:
            if m.name == "comment":
                return str(m.get_all_parameters().get("comment", [""])[0]).strip('"')
        return ""

    def _entries(self, chain: str) -> list[tuple[str, int, int]]:
        return X.entries(self.table, chain)

    def read(self) -> Model:
        """Our chains as the kernel holds them (every rule: start, repair)."""
        out: Model = {}
        self.unflagged: set[str] = set()  # chains whose bridge-port lookups are lost
        for chain in self.table.chains:
            if chain.name.startswith(R.PREFIX):
                got = self._entries(chain.name)
                out[chain.name] = [c for c, _p, _b in got]
                if sum(p for _c, p, _b in got) != sum(b for _c, _p, b in got):
                    self.unflagged.add(chain.name)
        for hook in self.hooks:
            if self.table.is_chain(hook):
                out[hook] = self.read_hook(hook)
        return out

    def counters(self, chain: str) -> list[tuple[int, int]]:
        """Each rule's (packets, bytes), without parsing the rules (libiptc's
        own walk: python-iptables' wraps every step)."""
        out = []
        lib, handle = self.lib, self.table._handle
        entry = lib.iptc_first_rule(chain.encode(), handle)
        while entry:
            c = entry.contents.counters
            out.append((c.pcnt, c.bcnt))
            entry = lib.iptc_next_rule(entry, handle)
        return out

    def by_port_lookups(self, chain: str) -> tuple[int, int, int]:
        """(set matches looking up by input interface, by bridge port, rules)
        in this chain: the flag is not in any rule's text, so a restore of
        saved rules drops it without changing a comment."""
        got = self._entries(chain)
        return sum(p for _c, p, _b in got), sum(b for _c, _p, b in got), len(got)

    def delete_at(self, chain: str, index: int) -> None:
        # python-iptables deletes by rule only; libiptc can by position.
        if self.table._iptc.iptc_delete_num_entry(chain.encode(), index, self.table._handle) != 1:
            raise EnforcerError(f"deleting rule {index} of {chain}: {self.table.strerror()}")

    def sync_chain(self, chain: str, have: list[str], want: list[R.Rule], hook: bool = False,
                    retired: dict[str, tuple[int, int]] | None = None) -> list[str]:
        """Edit one chain from `have` to `want` by position. Replaced rules keep
        the counters of the rules with the same tag they replace; the counts of
        counting rules that go without a successor are added to `retired`
        (tag -> packets, bytes). Returns the chain's comments afterwards."""
        want_c = [r.comment(self.family) for r in want]
        if hook:  # only our own rules move; they go first
            ours = [i for i, c in enumerate(have) if R.parse_comment(c)]
            if ours == list(range(len(want_c))) and [have[i] for i in ours] == want_c:
                return have
            for i in reversed(ours):
                self.delete_at(chain, i)
            for i, spec in enumerate(want):
                self._insert(chain.encode(), self.new_rule(spec), i)
            return want_c + [c for c in have if not R.parse_comment(c)]
        name = chain.encode()
        if not self.table.is_chain(chain):
            self.table.create_chain(chain)
            have = []
        if have == want_c:
            return have
        if not have:  # a new chain (a full apply onto an empty table): in order
            append, handle, new_rule = self.lib.iptc_append_entry, self.table._handle, \
                self.new_rule
            for spec in want:
                if append(name, new_rule(spec), handle) != 1:
                    raise self.iptc.IPTCError(f"can't append a rule to {chain}: "
                                              f"{self.table.strerror()}")
            return want_c
        counters = self.counters(chain)
        if len(counters) != len(have):  # edited behind our back: start the chain afresh
            self.table.flush_entries(chain)
            have, counters = [], []
        ops = difflib.SequenceMatcher(a=have, b=want_c, autojunk=False).get_opcodes()
        # Only rules that go hand their counts on: a rule that stays keeps its
        # own, and giving it to a new rule of the same tag too (a throttle's
        # port-25 rule before the class's) would count those attempts twice.
        carry: dict[str, list[tuple[int, int]]] = {}
        for op, i1, i2, _j1, _j2 in ops:
            if op == "equal":
                continue
            for c, n in zip(have[i1:i2], counters[i1:i2], strict=True):
                parsed = R.parse_comment(c)
                if parsed:
                    carry.setdefault(parsed[0], []).append(n)
        for op, i1, i2, j1, j2 in reversed(ops):
            if op == "equal":
                continue
            for _ in range(i2 - i1):
                self.delete_at(chain, i1)
            for k, spec in enumerate(want[j1:j2]):
                raw = self.new_rule(spec)
                kept = carry.get(spec.tag)
                if kept and spec.reason:
                    raw = self.with_counters(raw, kept.pop(0))
                self._insert(name, raw, i1 + k)
        if retired is not None:
            for tag, left in carry.items():
                for p, b in left:
                    if R.counted(tag) and p:
                        was = retired.get(tag, (0, 0))
                        retired[tag] = (was[0] + p, was[1] + b)
        return want_c

    def tally(self, have: list[str], retired: dict[str, dict[str, tuple[int, int]]],
              forget: set[str]) -> list[str]:
        """Add retired counts (ifname -> tag -> counts) to the tally chain and
        drop the tallies of forgotten interfaces: one rule per (ifname, tag)."""
        chain = R.TALLY_CHAIN
        if not self.table.is_chain(chain):
            self.table.create_chain(chain)
            have = []
        counters = self.counters(chain)
        if len(counters) != len(have):
            self.table.flush_entries(chain)
            have, counters = [], []
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for c, n in zip(have, counters, strict=True):
            parsed = R.parse_comment(c)
            key = R.parse_tally(parsed[0]) if parsed else None
            if key:
                totals[key] = n
        changed = False
        for ifname, tags in retired.items():
            for tag, (p, b) in tags.items():
                was = totals.get((ifname, tag), (0, 0))
                totals[(ifname, tag)] = (was[0] + p, was[1] + b)
                changed = True
        for key in [k for k in totals if k[0] in forget]:
            del totals[key]
            changed = True
        if not changed:
            return have
        self.table.flush_entries(chain)
        out = []
        for (ifname, tag), n in sorted(totals.items()):
            spec = R.tally_rule(ifname, tag)
            rule = self._build(spec)
            rule.counters = n
            self.table.append_entry(chain, rule.rule)
            out.append(spec.comment(self.family))
        return out

    def commit(self, what: str, after: XtTable | None = None,
               background: bool = False) -> None:
        """Replace the kernel's table with ours. after: a table whose own
        replace must be done (and must have worked) first. background: in a
        thread, so the kernel checks this table while the caller builds the
        next (libiptc lets go of the GIL; finish() waits and says how it went)."""
        if after is not None:
            after.finish()
        if not background:
            self._commit(what, False)
            return
        self._pending = threading.Thread(target=self._commit, args=(what, True),
                                         name=f"commit-{self.family}", daemon=True)
        self._pending.start()

    def _commit(self, what: str, background: bool) -> None:
        try:
            self.table.commit()
        except Exception as exc:  # in a thread, anything must reach finish()
            if not background and not isinstance(exc, self.iptc.IPTCError):
                raise
            failed = EnforcerError(f"{what}: {exc}")
            if not background:
                raise failed from exc
            failed.__cause__ = exc
            self._failed = failed  # for finish(), in the caller's thread

    def finish(self) -> None:
        """Wait for a background replace; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def read_hook(self, hook: str) -> list[str]:
        return [c for c, _p, _b in self._entries(hook)]

    def jumps_first(self, hook: str, n: int) -> bool:
        """Whether the hook's first n rules jump to our chain (cheap)."""
        targets: list[str] = []
        entry = self.table.first_rule(hook)
        while entry and len(targets) < n:
            t = self.table.get_target(entry)
            targets.append(t.decode() if isinstance(t, bytes) else t)
            entry = self.table.next_rule(entry)
        return targets == [self.entry] * n

