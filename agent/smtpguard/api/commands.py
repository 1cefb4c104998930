"""What the control socket's commands do, run on the agent's main loop.

The commands ask the running agent only for what `RunningAgent` lists; the
agent (daemon/agent.py) satisfies it and imports this module, never the reverse.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from smtpguard.datapath.snapshot import union
from smtpguard.errors import SmtpguardError
from smtpguard.inventory.identity import Uncovered
from smtpguard.policy.membership import facts_of, place
from smtpguard.policy.units import parse_duration

if TYPE_CHECKING:
    from smtpguard.datapath.snapshot import Snapshot
    from smtpguard.detect.engine import Detector
    from smtpguard.enforce.keeper import Keeper
    from smtpguard.inventory.vmiface import VmIface
    from smtpguard.policy import LoadedPolicy, Policy
    from smtpguard.respond.responder import Responder


class RunningAgent(Protocol):
    """What the operator's commands may ask of the running agent: its VMs'
    interfaces, state, policy and evidence to read, and reload and announce
    to act (operator actions go through the detector, as its own do)."""

    @property
    def ifaces(self) -> Mapping[int, VmIface]: ...
    @property
    def names(self) -> Mapping[str, str]: ...  # vm id -> its name when last seen
    @property
    def detector(self) -> Detector | None: ...
    @property
    def keeper(self) -> Keeper | None: ...
    @property
    def responder(self) -> Responder | None: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def loaded(self) -> LoadedPolicy: ...
    @property
    def generation(self) -> int: ...
    def snapshot(self) -> Snapshot: ...
    def uncovered(self) -> list[Uncovered]: ...
    def reload(self) -> None: ...
    def announce(self, op: str, xml: str) -> dict[str, Any]: ...


def _vms(agent: RunningAgent) -> dict[str, list[VmIface]]:
    out: dict[str, list[VmIface]] = {}
    for v in agent.ifaces.values():
        out.setdefault(v.vm, []).append(v)
    return out


def status(agent: RunningAgent) -> list[dict[str, Any]]:
    """One row per VM (with interfaces, or with a record in force)."""
    assert agent.detector is not None
    det = agent.detector
    vms = _vms(agent)
    snap = agent.snapshot()
    now = time.monotonic_ns() / 1e9
    rows = []
    for vm in sorted(set(vms) | {r.vm for r in det.records.values() if r.state != "ok"}):
        vifs = vms.get(vm, [])
        facts = facts_of(vm, vifs)
        cls = place(agent.policy, facts).cls
        rec = det.record(vm)
        dests = union(snap.ifaces[v.ifindex] for v in vifs if v.ifindex in snap.ifaces)
        first = min(vifs, key=lambda v: v.ifname) if vifs else None
        rows.append({
            "vm": vm, "name": first.display if first else known_names(agent).get(vm, vm),
            "uuid": first.uuid if first else None,
            "tenant": first.tenant if first else None,
            "source": first.source if first else None,
            "interfaces": sorted(v.ifname for v in vifs),
            "attachment": ",".join(sorted({v.attachment for v in vifs})) or None,
            "coverage": coverage(agent, vifs), "class": cls,
            "mode": agent.policy.mode_of(cls),
            "port25": agent.policy.classes[cls].port25,
            "attempts_1m": det.windows.value(vm, "attempts", 60, now),
            "attempts_1h": det.windows.value(vm, "attempts", 3600, now),
            "destinations_1m": dests.get("1m", 0.0), "destinations_1h": dests.get("1h", 0.0),
            "blocked_1h": det.windows.value(vm, "blocked_attempts", 3600, now),
            "state": rec.state, "until": rec.until, "reason": rec.reason, "actor": rec.actor,
            "since": rec.since or None,
        })
    for u in agent.uncovered():
        cls = place(agent.policy, facts_of(u.vm, [])).cls
        rows.append({
            "vm": u.vm, "name": u.name, "uuid": u.vm if u.source == "libvirt" else None,
            "tenant": u.tenant, "source": u.source, "interfaces": [], "attachment": u.reason,
            "coverage": f"none ({u.reason})", "class": cls,
            "mode": agent.policy.mode_of(cls), "port25": agent.policy.classes[cls].port25,
            "attempts_1m": 0.0, "attempts_1h": 0.0, "destinations_1m": 0.0,
            "destinations_1h": 0.0, "blocked_1h": 0.0, "state": "uncovered", "until": None,
            "reason": u.detail or None, "actor": None, "since": None,
        })
    return sorted(rows, key=lambda r: r["vm"])


def coverage(agent: RunningAgent, vifs: list[VmIface]) -> str:
    """What this host does about a VM: `full` (counted and enforced),
    `counted only (...)` where the backend cannot reach how it is plugged in,
    or `away` for a VM with a record here but no interface now."""
    if not vifs:
        return "away"
    if agent.keeper is None:
        return "counted only (enforcement off)"
    out = sorted({v.attachment for v in vifs if not agent.keeper.reaches(v)})
    if out:
        return f"counted only ({agent.keeper.enforcer.name} cannot reach {', '.join(out)})"
    return "full"


def known_names(agent: RunningAgent) -> dict[str, str]:
    """vm id -> the name it was last seen under (for VMs with no interface now)."""
    return dict(agent.names)


def resolve_vm(agent: RunningAgent, ref: str) -> str:
    """A VM's id from what an operator types: its id, its name (a libvirt
    domain's), its UUID, or one of its interfaces. Several VMs of that name:
    an error naming their ids."""
    vms = _vms(agent)
    records = agent.detector.records if agent.detector is not None else {}
    if ref in vms or ref in records:
        return ref
    low = ref.lower()
    by_iface = [v.vm for v in agent.ifaces.values() if v.ifname == ref]
    if by_iface:
        return by_iface[0]
    hits = {v.vm for v in agent.ifaces.values() if v.display == ref or (v.uuid or "") == low}
    hits |= {vm for vm, name in known_names(agent).items() if name == ref}
    if len(hits) > 1:
        raise SmtpguardError(f"{len(hits)} VMs are named {ref!r}: use one of their ids "
                             f"({', '.join(sorted(hits))})")
    if hits:
        return hits.pop()
    for u in agent.uncovered():
        if ref in (u.vm, u.name):
            raise SmtpguardError(f"VM {u.name!r} ({u.vm}) is uncovered ({u.reason}): its "
                                 "traffic bypasses the host kernel, nothing here can stop it")
    raise SmtpguardError(f"no VM {ref!r} on this host (by id, name, UUID or interface)")


def _target(agent: RunningAgent, req: dict[str, Any]) -> tuple[str, list[str]]:
    ref = req.get("vm")
    if not isinstance(ref, str) or not ref:
        raise SmtpguardError("which VM? (vm is missing)")
    vm = resolve_vm(agent, ref)
    ifnames = sorted(v.ifname for v in _vms(agent).get(vm, []))
    return vm, ifnames


def _duration(req: dict[str, Any]) -> float | None:
    value = req.get("for")
    if value in (None, ""):
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise SmtpguardError(f"--for: {exc}") from exc


def handle(agent: RunningAgent, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req["cmd"]
    det = agent.detector
    if det is None:
        raise SmtpguardError("detection is not running")
    who = str(req.get("who") or "root")
    if cmd == "status":
        return {"ok": True, "vms": status(agent), "policy_generation": agent.generation}
    if cmd == "flags":
        return {"ok": True, "vms": [r for r in status(agent)
                                    if r["state"] not in ("ok", "uncovered")]}
    if cmd in ("block", "throttle", "release"):
        vm, ifnames = _target(agent, req)
        tr = det.operator(vm, ifnames, cmd, who, _duration(req), str(req.get("reason") or ""))
        return {"ok": True, "vm": vm, "name": known_names(agent).get(vm, vm), "state": tr.new,
                "until": tr.until, "reason": tr.reason, "interfaces": ifnames}
    if cmd == "reload":
        before = agent.generation
        agent.reload()
        if agent.generation == before:
            raise SmtpguardError("policy rejected; the running policy stays in force (see "
                                 "the policy.rejected log for every error)")
        return {"ok": True, "policy_generation": agent.generation}
    if cmd == "libvirt_hook":
        op, xml = req.get("op"), req.get("xml")
        if not isinstance(op, str) or not isinstance(xml, str):
            raise SmtpguardError("libvirt_hook needs op and xml")
        return agent.announce(op, xml)
    if cmd in ("incidents", "incident", "explain"):
        return _evidence(agent, cmd, req)
    if cmd == "history":
        assert det is not None
        rows = det.store.history(req.get("vm")) if det.store is not None else []
        return {"ok": True, "transitions": [t.__dict__ for t in rows]}
    raise SmtpguardError(f"unknown command {cmd!r}")


def _evidence(agent: RunningAgent, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
    r = agent.responder
    assert r is not None
    if cmd == "incidents":
        vm = req.get("vm") or None
        try:
            since = float(req.get("since") or 0.0)
        except (TypeError, ValueError) as exc:
            raise SmtpguardError(f"since {req.get('since')!r} is not a time") from exc
        if vm is not None and not isinstance(vm, str):
            raise SmtpguardError("vm must be a name")
        if vm is not None:
            vm = resolve_vm(agent, vm)
        return {"ok": True, "incidents": r.incidents.list(vm, since)}
    if cmd == "incident":
        try:
            ident = int(req.get("id"))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise SmtpguardError(f"incident id {req.get('id')!r} is not a number") from exc
        inc = r.incidents.show(ident)
        if inc is None:
            raise SmtpguardError(f"no incident {ident}")
        return {"ok": True, "incident": inc}
    ref = req.get("vm")
    for u in agent.uncovered():
        if ref in (u.vm, u.name):
            return {"ok": True, "explain": explain_uncovered(agent, u)}
    vm, _ifnames = _target(agent, req)
    return {"ok": True, "explain": explain_vm(agent, vm)}


def explain_uncovered(agent: RunningAgent, u: Uncovered) -> dict[str, Any]:
    """explain for a VM whose traffic bypasses the host kernel: what its
    class would be, and that nothing here counts or enforces it."""
    from smtpguard.policy.explain import explain

    e = explain(agent.loaded, facts_of(u.vm, []))
    e.update(interfaces=[], attachment=u.reason, coverage=f"none ({u.reason})",
             state="uncovered", until=None, since=None,
             reason=f"its traffic bypasses the host kernel ({u.detail or u.reason})",
             actor="", rule=None, enforced=False, incident=None,
             activity={"attempts": 0, "destinations": 0, "top_destinations": []})
    return e


def explain_vm(agent: RunningAgent, vm: str) -> dict[str, Any]:
    """What the VM may do, its state, why, and until when (`smtpguard explain`)."""
    from smtpguard.policy.explain import explain

    assert agent.responder is not None and agent.detector is not None
    vifs = sorted(_vms(agent).get(vm, []), key=lambda v: v.ifname)
    facts = facts_of(vm, vifs)
    e = explain(agent.loaded, facts)
    rec = agent.detector.record(vm)
    inc = agent.responder.incidents.latest(vm)
    last = inc["actions"][-1] if inc else None
    e.update(interfaces=[v.ifname for v in vifs],
             attachment=",".join(sorted({v.attachment for v in vifs})) or None,
             coverage=coverage(agent, vifs), state=rec.state, until=rec.until,
             since=rec.since or None, reason=rec.reason or None, actor=rec.actor,
             rule=(last or {}).get("rule") if rec.state != "ok" else None,
             enforced=(last or {}).get("enforced", True),
             incident=None if inc is None else {
                 k: inc[k] for k in ("id", "opened", "closed", "state")},
             activity=agent.responder.activity(vm))
    return e
