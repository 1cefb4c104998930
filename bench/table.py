"""One row of the benchmark table, and the table itself (text and JSON).

Every row carries its side-by-side baseline (measured in the same run where
there is one), the target from the benchmarks issue and a verdict. Rows
without a target are context for the rows that have one."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    section: str  # "1 throughput", "2 BPF cost", ...
    name: str
    value: float
    unit: str
    baseline: str = ""  # what it is compared with, and that figure
    target: str = ""  # as written in the issue, e.g. ">= 0.97"
    ok: bool | None = None  # None: no target, context only
    note: str = ""  # why it misses, or how it was measured

    @property
    def verdict(self) -> str:
        return "-" if self.ok is None else "met" if self.ok else "MISSED"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, -(-int(p * len(s)) // 100) - 1))]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def render(rows: list[Row]) -> str:
    cols = [("benchmark", [r.name for r in rows]),
            ("value", [f"{fmt(r.value)} {r.unit}" for r in rows]),
            ("baseline (same run)", [r.baseline for r in rows]),
            ("target", [r.target for r in rows]),
            ("verdict", [r.verdict for r in rows])]
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals in cols]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(cols, widths, strict=True))]
    section = None
    for i, r in enumerate(rows):
        if r.section != section:
            section = r.section
            lines.append(f"-- {section}")
        lines.append("  ".join(vals[i].ljust(w) for (_, vals), w
                               in zip(cols, widths, strict=True)).rstrip())
    notes = [f"  [{r.name}] {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import os

    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text()
                .splitlines() if ln.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_mb": mem,
            "kernel": platform.release(), "python": platform.python_version()}


def write_json(rows: list[Row], path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine": machine(), "seconds": round(seconds, 1),
        "rows": [{**asdict(r), "value": round(r.value, 4), "verdict": r.verdict}
                 for r in rows]}, indent=2) + "\n")
