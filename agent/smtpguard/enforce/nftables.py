"""The nftables backend: our three tables (`bridge smtpguard`, `inet smtpguard`,
`netdev smtpguard`; nft_chains.py says which VM packets each one sees) applied
through libnftables' JSON API, each change one atomic transaction."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any

from smtpguard import logs
from smtpguard.enforce import counts, render
from smtpguard.enforce.counts import BlockedCount
from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.enforce.nft_kernel import (
    device_chains,
    in_scratch_netns,
    nft,
    parse_table,
    present,
    probe,
    remove_tables,
    rule_counts,
)
from smtpguard.errors import BackendUnavailable, EnforcerError

__all__ = ["BlockedCount", "NftablesEnforcer", "dry_run", "in_scratch_netns", "probe",
           "remove_tables"]

class NftablesEnforcer:
    """Idempotent: apply() brings our tables to the desired state whatever
    they hold (nothing, an older ruleset, a half-deleted one)."""

    name = "nftables"
    reaches = frozenset({"bridge", "routed", "ovs", "macvtap"})

    def __init__(self, caps: Capabilities | None = None) -> None:
        self.n = nft()
        rc, _out, err = self.n.cmd("list tables")
        if rc != 0:
            raise BackendUnavailable(f"the kernel's nf_tables does not answer: "
                                     f"{err.strip() or rc}")
        self._probed = caps is not None
        if caps is None:
            try:
                caps = probe()
                self._probed = True
            except (EnforcerError, OSError) as exc:
                # No scratch namespace (no CAP_SYS_ADMIN): learn from the first apply.
                logs.get().info("nft.probe_unavailable", error=str(exc))
                caps = Capabilities()
        self.caps = caps
        self._lock = threading.Lock()  # one libnftables context, two threads
        # Scrapes list whole sets (the dedup memory can hold 131,072 elements,
        # seconds to list): on a context of their own, never holding up the loop.
        self._scrape = nft()
        self._scrape_lock = threading.Lock()
        # The rejection counters, hot and retired (counts.py), and the sized
        # sets of the last apply (a scrape lists those one by one).
        self.counters = counts.Counters(self._list_set, self._text, self._json)
        self._sized: dict[str, list[str]] = {}

    # -- low level ---------------------------------------------------------
    def _json(self, cmds: list[dict[str, Any]], what: str) -> None:
        with self._lock:
            rc, _out, err = self.n.json_cmd({"nftables": cmds})
        if rc != 0:
            raise EnforcerError(f"{what}: {err.strip() or rc}")

    def _text(self, script: str) -> tuple[int, str]:
        """nft commands in its own syntax, one transaction: (rc, error)."""
        with self._lock:
            rc, _out, err = self.n.cmd(script)
        return rc, err.strip()

    def _list(self, family: str) -> dict[str, Any] | None:
        with self._lock:
            rc, out, _err = self.n.cmd(f"list table {family} {render.TABLE}")
        return None if rc != 0 else parse_table(out)

    def observe(self) -> dict[str, dict[str, Any] | None]:
        return {fam: self._list(fam) for fam in render.FAMILIES}

    def drift(self, desired: Desired) -> list[str]:
        """Families whose table is missing or lost rules (flushed, deleted;
        a device chain the kernel dropped with its device). Counted over
        netlink (pyroute2): libnftables would fetch every set element first,
        seconds when the dedup memory is full."""
        desired = present(desired)
        have = rule_counts()
        return [fam for fam in render.FAMILIES if fam not in have or have[fam]
                != sum(len(r) for r in render.chains(desired, fam, self.caps).values())]

    # -- the backend interface ---------------------------------------------
    def apply(self, desired: Desired) -> None:
        """Our tables to the desired state, in one transaction. Without a
        probe, a rejected reject falls back to drop for that family."""
        try:
            self._apply(desired)
        except EnforcerError:
            if desired.hooks:  # a device went between the check and the apply
                try:
                    return self._apply(desired)
                except EnforcerError:
                    pass
            if self._probed:
                raise
            for fallback in (Capabilities(False, True, True), Capabilities(False, True, False),
                             Capabilities(False, False, False)):
                self.caps = fallback
                try:
                    self._apply(desired)
                except EnforcerError:
                    continue
                self._probed = True
                return
            raise

    def _apply(self, desired: Desired) -> None:
        desired = present(desired)
        observed = self.observe()
        self._typeof_sets(observed)
        observed = self.observe()
        cmds: list[dict[str, Any]] = []
        now = time.time()
        for fam in render.FAMILIES:
            cmds += render.table_commands(fam, desired, self.caps, observed[fam], now)
            if (observed[fam] or {}).get("counters", {}).get("overflow"):
                # The named counter of earlier versions (the flushed rules were its users).
                cmds.append({"delete": {"counter": {"family": fam, "table": render.TABLE,
                                                    "name": "overflow"}}})
        self.counters.invalidate()  # a set whose definition changed was recreated empty
        self._json(cmds, "applying the smtpguard tables")
        self._sized = {fam: sorted({n for n, b in render.sets(desired, fam).items()
                                    if b.get("size") and not n.startswith("old_")}
                                   | set(render.TYPEOF_SETS))
                       for fam in render.FAMILIES}

    def set_vms(self, desired: Desired) -> None:
        """VM classes changed (a VM came, went or moved): their elements, and
        the netdev table's device chains (a device came, went or changed
        its attachment), in one transaction."""
        desired = present(desired)
        cmds: list[dict[str, Any]] = []
        for fam in render.FAMILIES:
            cmds += render.element_commands(fam, desired, render.CLASS_SETS)
        cmds += render.device_commands(desired, device_chains())
        try:
            self._json(cmds, "updating VM classes and devices")
        except EnforcerError:
            if not desired.hooks:
                raise
            # A device vanished since the check (a kernel that refuses to
            # hook a missing device): once more with what is there now.
            desired = present(desired)
            cmds = [c for fam in render.FAMILIES
                    for c in render.element_commands(fam, desired, render.CLASS_SETS)]
            self._json(cmds + render.device_commands(desired, device_chains()),
                       "updating VM classes and devices")

    def set_action(self, ifnames: list[str], action: Action | None,
                   classes: dict[str, str] | None = None, default_class: str = "default"
                   ) -> None:
        """Block or throttle these interfaces (or release them, action None),
        in one transaction touching only their vm_state elements."""
        there = self._actions_by_map()  # deleting what a map lacks would fail
        cmds: list[dict[str, Any]] = []
        now = time.time()
        for fam, name in there:
            obj = {"family": fam, "table": render.TABLE, "name": name}
            gone = [n for n in ifnames if n in there[(fam, name)]]
            if gone:
                cmds.append({"delete": {"element": {**obj, "elem": gone}}})
            if action is not None:
                pre = render.EGRESS if name.startswith(render.EGRESS) else ""
                elems = render.state_elements({n: action for n in ifnames}, classes or {},
                                              default_class, now, pre)
                if elems:
                    cmds.append({"add": {"element": {**obj, "elem": elems}}})
        if cmds:
            self._json(cmds, f"setting {action.kind if action else 'release'} on "
                             f"{', '.join(ifnames)}")

    def actions(self) -> dict[str, Action]:
        """Blocks and throttles in the kernel now (the bridge table is the reference)."""
        out: dict[str, Action] = {}
        for fam_actions in self._actions_by_map().values():
            for ifname, action in fam_actions.items():
                out.setdefault(ifname, action)
        return out

    def disagreeing(self) -> set[str]:
        """Interfaces whose block/throttle differs between our tables' state
        maps (an element deleted by hand in one): verify() puts all right."""
        fams = list(self._actions_by_map().values())
        names = set().union(*fams)
        return {n for n in names
                if len({(f[n].kind if n in f else None) for f in fams}) > 1}

    def _actions_by_map(self) -> dict[tuple[str, str], dict[str, Action]]:
        """(family, state map) -> the actions it holds, by interface."""
        now = time.time()
        by: dict[tuple[str, str], dict[str, Action]] = {}
        for fam in render.FAMILIES:
            for name in render.STATE_MAPS[fam]:
                by[(fam, name)] = self._state_map(fam, name, now)
        return by

    def _state_map(self, fam: str, name: str, now: float) -> dict[str, Action]:
        out: dict[str, Action] = {}
        for elem in self._list_set(fam, name, "map").get("elem", []):
            key, verdict = elem
            if isinstance(key, dict):
                ifname = key["elem"]["val"]
                until = now + float(key["elem"].get("expires", 0))
            else:
                ifname, until = key, None
            # elements written by earlier versions carry "jump"
            target = (verdict.get("goto") or verdict.get("jump") or {}).get("target", "")
            kind = "block" if target.removeprefix(render.EGRESS) == "block" else "throttle"
            out.setdefault(ifname, Action(kind, until))  # type: ignore[arg-type]
        return out

    def _list_set(self, family: str, name: str, kind: str = "set",
                  scrape: bool = False) -> dict[str, Any]:
        n, lock = (self._scrape, self._scrape_lock) if scrape else (self.n, self._lock)
        with lock:
            rc, out, _err = n.cmd(f"list {kind} {family} {render.TABLE} {name}")
        if rc != 0:
            return {}
        for obj in json.loads(out)["nftables"]:
            if kind in obj:
                return dict(obj[kind])
        return {}

    def blocked_counts(self) -> list[BlockedCount]:
        """Rejected attempts per (family, reason, interface, port), retired
        ones included; reads only the hot counter sets."""
        return self.counters.blocked()

    def report(self) -> tuple[list[BlockedCount], dict[tuple[str, str], tuple[int, int]], int]:
        """Blocked counts, set fill levels and overflows, on the scrape's own
        libnftables context: the sized sets one by one (a table or a named
        counter listed whole would fetch the retired elements too)."""
        with self.counters.lock:
            return self._report()

    def _report(self) -> tuple[list[BlockedCount], dict[tuple[str, str], tuple[int, int]],
                               int]:
        hot: list[BlockedCount] = []
        fill: dict[tuple[str, str], tuple[int, int]] = {}
        overflow = 0
        for fam in render.FAMILIES:
            names = self._sized.get(fam)
            if names is None:  # nothing applied by this process: read what is there
                with self._scrape_lock:
                    rc, out, _err = self._scrape.cmd(f"list table {fam} {render.TABLE}")
                if rc != 0:
                    continue
                listed = parse_table(out)["sets"]
            else:
                listed = {n: self._list_set(fam, n, scrape=True) for n in names}
            for name, st in listed.items():
                if st.get("size") and not name.startswith("old_"):
                    fill[(fam, name)] = (len(st.get("elem", [])), int(st["size"]))
            overflow += counts.packets(listed.get("overflow", {}))
            for reason in render.REASONS:
                hot += counts.parse(fam, reason, listed.get(counts.hot_set(reason), {}))
        return counts.merged(hot, self.counters.retired()), fill, overflow

    def retire(self, ifnames: Iterable[str]) -> int:
        """Move these (idle) interfaces' counters to the retired sets (counts.py)."""
        return self.counters.retire(ifnames)

    def forget(self, ifnames: Iterable[str]) -> None:
        """Drop the per-interface counters (hot and retired) of interfaces that are gone."""
        self.counters.forget(ifnames)

    def remove(self) -> bool:
        """Delete our tables (enforcement off). True if there was anything."""
        self.counters.invalidate()
        with self._lock:
            return remove_tables(self.n)

    def _typeof_sets(self, observed: dict[str, dict[str, Any] | None]) -> None:
        """Sets JSON cannot declare; adding them changes no verdict."""
        script = []
        for fam in render.FAMILIES:
            have = (observed[fam] or {}).get("sets", {})
            missing = [n for n in render.TYPEOF_SETS if n not in have]
            if missing:
                script.append(f"add table {fam} {render.TABLE}")
                script += [f"add set {fam} {render.TABLE} {n} {{ {render.TYPEOF_SETS[n]} }}"
                           for n in missing]
        if script:
            with self._lock:
                rc, _, err = self.n.cmd("\n".join(script))
            if rc != 0:
                raise EnforcerError(f"creating dedup sets: {err.strip()}")
            logs.get().debug("nft.typeof_sets_created", sets=script)


def dry_run(desired: Desired, caps: Capabilities | None = None) -> str:
    """The ruleset apply() would produce, in `nft -f` syntax (built in a
    scratch network namespace and listed back, so it is exactly the kernel's)."""
    def run() -> str:
        enf = NftablesEnforcer(caps or Capabilities())
        enf.apply(desired)
        enf.n.set_json_output(False)
        out = []
        for fam in render.FAMILIES:
            rc, text, err = enf.n.cmd(f"list table {fam} {render.TABLE}")
            if rc != 0:
                raise EnforcerError(f"listing {fam} table: {err}")
            out.append(text)
        return "".join(out)

    return in_scratch_netns(run)
