"""The evidence an incident and `smtpguard explain` carry: what became of a
VM's attempts per port (`outcomes`), its activity since it last started
afresh, and the class, rule, windows and policy that placed it. Mixed into
the Responder, whose attributes it reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from smtpguard.datapath import recent
from smtpguard.datapath.snapshot import read_ports
from smtpguard.detect.engine import Detector
from smtpguard.enforce.keeper import Keeper
from smtpguard.errors import SmtpguardError
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.explain import threshold_text
from smtpguard.policy.load import LoadedPolicy
from smtpguard.policy.membership import facts_of, place

WINDOWS = (("attempts", 60), ("attempts", 3600), ("blocked_attempts", 600),
           ("failed_handshakes", 600))  # recorded with each incident


def outcomes(per_iface: Mapping[int, Mapping[int, Any]], ifindexes: list[int],
             rejected: Mapping[int, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Per port, what became of a VM's attempts, adding up to them: completed,
    rejected (by smtpguard itself), reset and unanswered (by the other end),
    pending (no answer yet, or the client gave up before retrying).

    The datapath sees the wire: smtpguard's own TCP reset answers the SYN like
    a receiver's would, and a SYN it drops is retried until it counts as
    unanswered. So rejections (distinct attempts, counted by the enforcement)
    are taken out of the resets where the path rejects with a reset, and out
    of the unanswered where it drops."""
    ports: dict[str, dict[str, int]] = {}
    for ifindex, per_port in per_iface.items():
        if ifindex not in ifindexes:
            continue
        for port, c in per_port.items():
            p = ports.setdefault(str(port), dict.fromkeys(
                ("attempts", "completed", "rejected", "reset", "no_answer", "pending",
                 "retransmits"), 0))
            for k in ("attempts", "completed", "reset", "no_answer", "retransmits"):
                p[k] += getattr(c, k)
    for port, (by_reset, by_drop) in rejected.items():
        if str(port) not in ports:
            continue
        p = ports[str(port)]
        p["rejected"] = by_reset + by_drop
        p["reset"] = max(0, p["reset"] - by_reset)
        p["no_answer"] = max(0, p["no_answer"] - by_drop)
    for p in ports.values():
        # Counters read a moment apart may overshoot: the columns still add up.
        left = max(0, p["attempts"] - p["completed"])
        for k in ("rejected", "reset", "no_answer"):
            p[k] = min(p[k], left)
            left -= p[k]
        p["pending"] = left
    return ports


class Evidence:
    """A VM's evidence, from the counters, the enforcement and the policy."""

    log: Any
    stats: Any
    recent: Any
    keeper: Keeper | None
    detector: Detector
    ifaces: Callable[[], Mapping[int, VmIface]]
    generation: Callable[[], int]
    loaded: Callable[[], LoadedPolicy]

    def _vifs(self, vm: str) -> list[VmIface]:
        return sorted((v for v in self.ifaces().values() if v.vm == vm),
                      key=lambda v: v.ifname)

    def class_of(self, vm: str) -> str:
        vifs = self._vifs(vm)
        facts = facts_of(vm, vifs)
        return place(self.detector.policy, facts).cls

    def mode_of(self, vm: str) -> str:
        return self.detector.policy.mode_of(self.class_of(vm))

    def activity(self, vm: str) -> dict[str, Any]:
        """What the VM did since it last started afresh: attempts and top
        destinations (the datapath's per-VM record), counters per port."""
        idx = [v.ifindex for v in self._vifs(vm)]
        dests = recent.top_destinations(self.recent, idx, limit=None) \
            if self.recent is not None and idx else []
        top = self.detector.policy.incidents.top_destinations
        ports = outcomes(read_ports(self.stats), idx, self._rejections(vm))
        return {"at": time.time(), "attempts": sum(d.attempts for d in dests),
                "destinations": len(dests),
                "top_destinations": [{"address": d.address, "attempts": d.attempts}
                                     for d in dests[:top]],
                "ports": ports}

    def _rejections(self, vm: str) -> dict[int, tuple[int, int]]:
        """port -> (attempts smtpguard rejected with a TCP reset, and dropped),
        for the VM's interfaces, from the enforcement's counters."""
        if self.keeper is None:
            return {}
        names = {v.ifname for v in self._vifs(vm)}
        caps = self.keeper.enforcer.caps
        out: dict[int, tuple[int, int]] = {}
        try:
            counts = self.keeper.enforcer.blocked_counts()
        except SmtpguardError as exc:
            self.log.debug("enforce.counts_failed", error=str(exc))
            return {}
        for c in counts:
            if c.ifname not in names:
                continue
            reset = caps.reject_bridge if c.family == "bridge" else caps.reject_inet
            r, d = out.get(c.port, (0, 0))
            out[c.port] = (r + c.packets, d) if reset else (r, d + c.packets)
        return out

    def context(self, vm: str, threshold: str | None) -> dict[str, Any]:
        """The class, mode, rule and policy an incident records."""
        loaded = self.loaded()
        pol = loaded.policy
        cls = self.class_of(vm)
        rule = None
        for i, t in enumerate(pol.classes[cls].thresholds):
            if t.label == threshold:
                rule = {"class": cls, "threshold": t.label, "text": threshold_text(t),
                        "where": loaded.where(f"classes.{cls}.thresholds.{i}")}
        now = time.monotonic_ns() / 1e9
        windows = {f"{m}_{w // 60 if w < 3600 else w // 3600}{'m' if w < 3600 else 'h'}":
                   float(self.detector.windows.value(vm, m, w, now)) for m, w in WINDOWS}
        vifs = self._vifs(vm)
        return {"class": cls, "mode": pol.mode_of(cls),
                "name": vifs[0].display if vifs else vm,
                "uuid": vifs[0].uuid if vifs else None,
                "tenant": vifs[0].tenant if vifs else None,
                "interfaces": [v.ifname for v in vifs], "rule": rule,
                "windows": windows,
                "policy": {"generation": self.generation(), "digest": loaded.digest,
                           "files": list(loaded.files) or ["built-in default"]}}
