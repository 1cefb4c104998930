"""`smtpguard policy explain`: the effective policy for one VM, in words."""

from __future__ import annotations

from typing import Any

from smtpguard.policy.classes import Threshold, VmClass
from smtpguard.policy.load import LoadedPolicy
from smtpguard.policy.membership import Placement, VmFacts, place
from smtpguard.policy.units import format_duration


def _rule_text(loaded: LoadedPolicy, p: Placement) -> str:
    if p.rule is None:
        return f"no members rule matched: default_class ({loaded.where('default_class')})"
    rule = loaded.policy.members[p.rule]
    crit = {k: str(v) for k, v in rule.model_dump(exclude={"cls"}, exclude_none=True).items()}
    what = ", ".join(f"{k} {v!r}" for k, v in crit.items())
    return f"members.{p.rule} ({what}) at {loaded.where(f'members.{p.rule}')}"


def threshold_text(t: Threshold) -> str:
    action = t.action if t.duration is None else f"{t.action} for {format_duration(t.duration)}"
    return f"{t.label}: {t.metric} >= {t.at_least} in {format_duration(t.window)} -> {action}"


def explain(loaded: LoadedPolicy, facts: VmFacts) -> dict[str, Any]:
    """The effective policy as data (the --json form)."""
    pol = loaded.policy
    p = place(pol, facts)
    c: VmClass = pol.classes[p.cls]
    return {
        "vm": facts.vm, "interface": facts.interface, "ips": list(facts.ips),
        "mac": facts.mac, "tenant": facts.tenant,
        "class": p.cls, "mode": pol.mode_of(p.cls), "placed_by": _rule_text(loaded, p),
        "class_defined_at": loaded.where(f"classes.{p.cls}"),
        "port25": c.port25, "redirect_to": [str(a) for a in c.redirect_to],
        "limit": None if c.limit is None else {"rate": str(c.limit.rate),
                                               "burst": c.limit.burst},
        "limited_ports": list(c.limited_ports) + ([25] if c.port25 in ("limit", "redirect")
                                                  else []),
        "throttle": {"rate": str(c.throttle.rate), "burst": c.throttle.burst},
        "relays": [str(r) for r in pol.relays],
        "smtp_ports": list(pol.smtp_ports),
        "thresholds": [threshold_text(t) for t in c.thresholds],
        "escalation": {"factor": c.escalation.factor,
                       "max": format_duration(c.escalation.max),
                       "forget_after": format_duration(c.escalation.forget_after)},
        "policy": {"files": list(loaded.files) or ["built-in default"],
                   "digest": loaded.digest},
    }


def render(e: dict[str, Any]) -> str:
    """The human form."""
    who = e["vm"] + "".join(f", {k} {e[k]}" for k in ("interface", "mac", "tenant") if e[k])
    if e["ips"]:
        who += f", ip {' '.join(e['ips'])}"
    p25 = {"block": "blocked (rejected at once)", "allow": "allowed",
           "limit": "allowed within the limit below",
           "redirect": f"redirected to {', '.join(e.get('redirect_to') or [])} within the "
                       "limit below"}[e["port25"]]
    if e.get("mode") == "audit":
        p25 += " (audit mode: counted and detected, not enforced)"
    lim = e["limit"]
    lines = [
        f"VM {who}",
        f"  class         {e['class']} ({e.get('mode', 'enforce')} mode)",
        f"  placed by     {e['placed_by']}",
        f"  port 25       {p25}, except to relays",
        f"  relays        {', '.join(e['relays']) or '(none)'} (always allowed, every port)",
        "  limit         " + (f"{lim['rate']}, burst {lim['burst']}, new connections on ports "
                             f"{', '.join(map(str, e['limited_ports']))}" if lim and
                             e["limited_ports"] else "(none)"),
        f"  throttled to  {e['throttle']['rate']}, burst {e['throttle']['burst']}",
        "  thresholds",
        *(f"    {t}" for t in e["thresholds"] or ["(none)"]),
        f"  escalation    x{e['escalation']['factor']:g} per repeat block, at most "
        f"{e['escalation']['max']}, offences forgotten after {e['escalation']['forget_after']}",
        f"  policy        {', '.join(e['policy']['files'])} ({e['policy']['digest']})",
    ]
    return "\n".join(lines)
