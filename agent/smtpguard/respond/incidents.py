"""Incidents: the evidence behind every flag, throttle and block, for the
abuse desk and for the tenant who asks why.

An incident opens at a VM's first flag, throttle or block of an episode,
gathers every later action (escalation, an operator's block or release) and
closes when the VM is back to ok. It records what justified each action (the
threshold, its definition and where the policy says it, the figures that
crossed it, the VM's windows then), the policy generation, who acted and
whether it was enforced (audit mode: not), and the VM's activity: attempts
and top destination addresses with their counts (the datapath's bounded
per-VM record), attempts and handshake outcomes per port. The activity is
live while the incident is open and frozen when it closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from smtpguard import logs
from smtpguard.detect.machine import Transition
from smtpguard.errors import StoreError
from smtpguard.respond.store import Store

ACTION = {"flagged": "flag", "throttled": "throttle", "blocked": "block", "ok": "release"}
Activity = Callable[[str], dict[str, Any]]  # vm -> its activity now
Context = Callable[[str, str | None], dict[str, Any]]  # vm, threshold -> class, rule, ...


class IncidentBook:
    """Open incidents by VM, kept in the store (in memory when there is none)."""

    def __init__(self, store: Store | None, activity: Activity, context: Context,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.activity = activity
        self.context = context
        self.wall = wall
        self.log = logs.get()
        self.open: dict[str, dict[str, Any]] = {}  # vm -> incident
        self._memory: dict[int, dict[str, Any]] = {}  # what the store could not take
        # Ids of incidents kept in memory only never clash with the store's.
        self._next_id = 1 if store is None else 10**9

    def start(self) -> None:
        """Pick up the incidents still open when the agent stopped."""
        if self.store is None:
            return
        try:
            for inc in self.store.incidents(open_only=True):
                self.open[inc["vm"]] = inc
        except StoreError as exc:
            self.log.error("store.failed", error=str(exc))

    def record(self, t: Transition, enforced: bool) -> dict[str, Any] | None:
        """Add a transition to the VM's incident (opening or closing it)."""
        inc = self.open.get(t.vm)
        if inc is None and t.new == "ok":
            return None  # nothing open: a flag cleared without one (an older agent)
        ctx = self.context(t.vm, t.threshold)
        action = {"at": t.at, "action": ACTION[t.new] if enforced or t.new == "ok"
                  else f"would_{ACTION[t.new]}", "state": t.new, "previous": t.old,
                  "actor": t.actor, "until": t.until, "reason": t.reason,
                  "threshold": t.threshold, "rule": ctx.get("rule"), "figures": t.figures,
                  "offence": t.offence, "enforced": enforced,
                  "policy_generation": ctx.get("policy", {}).get("generation")}
        if inc is None:
            inc = {"vm": t.vm, "name": ctx.get("name"), "uuid": ctx.get("uuid"),
                   "tenant": ctx.get("tenant"), "opened": t.at, "closed": None,
                   "state": t.new, "mode": ctx.get("mode"), "class": ctx.get("class"),
                   "interfaces": ctx.get("interfaces", []), "policy": ctx.get("policy"),
                   "trigger": {k: action[k] for k in ("reason", "threshold", "rule",
                                                      "figures", "actor")},
                   "windows": ctx.get("windows", {}), "actions": [action]}
            inc["id"] = self._add(inc)
            self.open[t.vm] = inc
            self.log.info("incident.opened", incident=inc["id"], vm=t.vm, state=t.new,
                          reason=t.reason)
            return inc
        inc["actions"].append(action)
        inc["state"] = t.new
        if t.new == "ok":
            inc["closed"] = t.at
            inc["activity"] = self.activity(t.vm)  # frozen from now on
            del self.open[t.vm]
            self.log.info("incident.closed", incident=inc["id"], vm=t.vm, reason=t.reason)
        self._save(inc)
        return inc

    def _add(self, inc: dict[str, Any]) -> int:
        if self.store is not None:
            try:
                return self.store.add_incident(inc["vm"], inc["opened"], inc)
            except StoreError as exc:
                self.log.error("store.failed", error=str(exc))
        ident = self._next_id
        self._next_id += 1
        self._memory[ident] = inc
        return ident

    def _save(self, inc: dict[str, Any]) -> None:
        if self.store is not None and inc["id"] not in self._memory:
            try:
                self.store.update_incident(inc["id"], inc, inc["closed"])
            except StoreError as exc:
                self.log.error("store.failed", error=str(exc))

    def _all(self, vm: str | None, since: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if self.store is not None:
            try:
                rows = self.store.incidents(vm, since)
            except StoreError as exc:
                self.log.error("store.failed", error=str(exc))
        rows += [i for i in self._memory.values() if (vm is None or i["vm"] == vm)
                 and (i["opened"] >= since or i["closed"] is None)]
        return sorted(rows, key=lambda i: int(i["id"]))

    def list(self, vm: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        """Summaries, oldest first."""
        return [{k: i.get(k) for k in ("id", "vm", "name", "opened", "closed", "state",
                                       "mode", "class")}
                | {"reason": i["actions"][-1]["reason"] if i["state"] != "ok"
                   else i["trigger"]["reason"], "actions": len(i["actions"])}
                for i in self._all(vm, since)]

    def show(self, ident: int) -> dict[str, Any] | None:
        """One incident in full; an open one with its activity as of now."""
        inc: dict[str, Any] | None = self._memory.get(ident)
        if inc is None and self.store is not None:
            inc = self.store.incident(ident)
        if inc is None:
            return None
        if inc["closed"] is None:
            inc = {**inc, "activity": self.activity(inc["vm"])}
        return inc

    def latest(self, vm: str) -> dict[str, Any] | None:
        """The VM's open incident, else its most recent one."""
        if vm in self.open:
            return self.show(int(self.open[vm]["id"]))
        rows = self._all(vm, 0.0)
        return self.show(int(rows[-1]["id"])) if rows else None

    def prune(self, retention: float) -> int:
        """Forget closed incidents older than the retention."""
        before = self.wall() - retention
        gone = [i for i, inc in self._memory.items()
                if inc["closed"] is not None and inc["closed"] < before]
        for i in gone:
            del self._memory[i]
        if self.store is not None:
            try:
                return len(gone) + self.store.prune_incidents(before)
            except StoreError as exc:
                self.log.error("store.failed", error=str(exc))
        return len(gone)


def _who(inc: dict[str, Any]) -> str:
    """`web1 (id 6f1c..., tenant acme)`, or the id alone when it is the name."""
    name = str(inc.get("name") or inc["vm"])
    extra = [f"id {inc['vm']}"] if name != inc["vm"] else []
    if inc.get("tenant"):
        extra.append(f"tenant {inc['tenant']}")
    return name + (f" ({', '.join(extra)})" if extra else "")


def render(inc: dict[str, Any]) -> str:
    """An incident as text an abuse desk can paste into a ticket."""
    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

    act = inc.get("activity") or {}
    trig = inc["trigger"]
    rule = trig.get("rule") or {}
    lines = [
        f"Incident {inc['id']}: VM {_who(inc)} ({inc.get('class')} class, "
        f"{inc.get('mode')} mode), interfaces {', '.join(inc.get('interfaces') or []) or '-'}",
        f"  opened   {when(inc['opened'])}",
        f"  closed   {when(inc['closed']) if inc['closed'] else 'open, state ' + inc['state']}",
        f"  why      {trig['reason']}",
    ]
    if rule:
        lines.append(f"  rule     {rule.get('text')} ({rule.get('where')})")
    pol = inc.get("policy") or {}
    lines.append(f"  policy   generation {pol.get('generation')}, digest {pol.get('digest')}")
    if inc.get("windows"):
        lines.append("  figures  " + ", ".join(f"{k} {v:g}" for k, v in inc["windows"].items()))
    lines.append("  actions")
    for a in inc["actions"]:
        until = f" until {when(a['until'])}" if a.get("until") else ""
        lines.append(f"    {when(a['at'])}  {a['action']}{until} by {a['actor']}: {a['reason']}"
                     + ("" if a.get("enforced", True) else " (audit: not enforced)"))
    lines.append(f"  activity (as of {when(act.get('at'))})")
    lines.append(f"    attempts {act.get('attempts', 0)} to {act.get('destinations', 0)} "
                 "destinations")
    for port, c in sorted((act.get("ports") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"    port {port}: {c['attempts']} attempts: {c['completed']} completed, "
                     f"{c.get('rejected', 0)} rejected by smtpguard, {c['reset']} reset, "
                     f"{c['no_answer']} unanswered, {c.get('pending', 0)} pending")
    lines.append("    top destinations")
    for d in act.get("top_destinations") or []:
        lines.append(f"      {d['address']:<40} {d['attempts']}")
    return "\n".join(lines)
