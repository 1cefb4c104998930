"""One table (filter, or nat for redirects) of one family through
python-iptables (libiptc): reading our chains, editing them by position while
keeping counters, committing.

Nothing here decides what the rules should be (iptables_render does) or when
to change them (the backend, iptables.py). Every FilterTable is a fresh read
of the kernel's table; commit() replaces it in one step.
"""

from __future__ import annotations

import difflib
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
        # holds the set's index in this namespace, as it was when built
        self.templates: dict[R.Rule, bytes] = {}

    def is_chain(self, chain: str) -> bool:
        return bool(self.table.is_chain(chain))

    def drop_chain(self, chain: str) -> None:
        if self.table.is_chain(chain):
            self.table.flush_entries(chain)
            self.table.delete_chain(chain)

    def new_rule(self, spec: R.Rule) -> Any:
        shape = X.shape(spec)
        if shape is None:
            return self._build(spec)
        entry = self.iptc.ip4tc.ipt_entry if self.family == "ipv4" else \
            self.iptc.ip6tc.ip6t_entry
        if shape not in self.templates:  # the first of its shape, built for real
            self.templates[shape] = bytes(self._build(spec).rule)
        return X.RawRule(X.fill(self.templates[shape], spec, self.family, entry), entry)

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
        """Each rule's (packets, bytes), without parsing the rules."""
        out = []
        entry = self.table.first_rule(chain)
        while entry:
            out.append((int(entry.counters.pcnt), int(entry.counters.bcnt)))
            entry = self.table.next_rule(entry)
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
                self.table.insert_entry(chain, self.new_rule(spec).rule, i)
            return want_c + [c for c in have if not R.parse_comment(c)]
        if not self.table.is_chain(chain):
            self.table.create_chain(chain)
            have = []
        if have == want_c:
            return have
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
                rule = self.new_rule(spec)
                kept = carry.get(spec.tag)
                if kept and spec.reason:
                    rule.counters = kept.pop(0)
                self.table.insert_entry(chain, rule.rule, i1 + k)
                if kept is not None:
                    rule.counters = (0, 0)  # a shared rule goes on without them
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

    def commit(self, what: str) -> None:
        try:
            self.table.commit()
        except self.iptc.IPTCError as exc:
            raise EnforcerError(f"{what}: {exc}") from exc

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

