"""A VM's record as the fleet shares it: its detection record, the times of
its automatic blocks (the escalation's memory), and the host that decided.

Which record wins when two hosts disagree: the later decision, by the time
it was made (`since`, the wall clock of the transition), the host name
breaking a tie. A decision is what an operator or the detector did last, and
the one made last knew the most: an operator's release after a block wins on
every host, and so does a block after a release. etcd's compare-and-swap
(sync.py) makes sure no host overwrites a record it has not seen, so this
rule is applied to every pair of conflicting writes, even after a partition.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from smtpguard.detect.machine import VmRecord

FIELDS = ("state", "since", "until", "reason", "actor", "manual_until", "flagged_until")


@dataclass(frozen=True)
class FleetRecord:
    vm: str
    host: str
    state: str = "ok"
    since: float = 0.0
    until: float | None = None
    reason: str = ""
    actor: str = "auto"
    manual_until: float | None = None
    flagged_until: float | None = None
    blocks: tuple[float, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, rec: VmRecord, host: str, blocks: list[float]) -> FleetRecord:
        return cls(rec.vm, host, **{f: getattr(rec, f) for f in FIELDS},
                   blocks=tuple(blocks))

    def vm_record(self, baseline: float = 0.0) -> VmRecord:
        return VmRecord(self.vm, **{f: getattr(self, f) for f in FIELDS}, baseline=baseline)

    def newer_than(self, since: float, host: str) -> bool:
        return (self.since, self.host) > (since, host)

    def same_decision(self, other: FleetRecord) -> bool:
        return all(getattr(self, f) == getattr(other, f) for f in FIELDS)

    def to_json(self) -> str:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FleetRecord:
        d: dict[str, Any] = json.loads(text)
        d["blocks"] = tuple(d.get("blocks", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
