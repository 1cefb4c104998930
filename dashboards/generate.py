"""Generate the Grafana dashboard (smtpguard.json) from this file.

    python dashboards/generate.py            # rewrite smtpguard.json
    python dashboards/generate.py --check    # exit 1 if it is out of date

Importable into current Grafana: a ${datasource} variable (Prometheus), a
host selector (the scrape target's `instance`) and a VM selector. Every
query here is evaluated against a real Prometheus in the test suite
(tests/integration/test_observability.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("smtpguard.json")
SEL = 'instance=~"$host"'
VMSEL = 'instance=~"$host", vm=~"$vm"'
RI = "$__rate_interval"
_ids = iter(range(1, 1000))


def target(expr: str, legend: str = "") -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
            "legendFormat": legend, "refId": "A"}


def panel(title: str, kind: str, exprs: list[tuple[str, str]], x: int, y: int, w: int = 12,
          h: int = 8, unit: str = "short", description: str = "") -> dict[str, Any]:
    targets = [dict(target(e, legend), refId=chr(65 + i)) for i, (e, legend) in enumerate(exprs)]
    return {
        "id": next(_ids), "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right"}}
        if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {"id": next(_ids), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def panels() -> list[dict[str, Any]]:
    return [
        row("Fleet", 0),
        panel("VMs by state", "stat",
              [(f"count by (state) (smtpguard_vm_state{{{SEL}}} == 1)", "{{state}}")],
              0, 1, 8, 4),
        panel("SMTP attempts /s", "stat",
              [(f"sum(rate(smtpguard_smtp_connection_attempts_total{{{SEL}}}[{RI}]))", "")],
              8, 1, 8, 4, "ops"),
        panel("Blocked attempts /s", "stat",
              [(f"sum(rate(smtpguard_smtp_blocked_attempts_total{{{SEL}}}[{RI}]))", "")],
              16, 1, 8, 4, "ops"),
        panel("Top VMs by attempts /s", "timeseries",
              [(f"topk(10, sum by (vm) (rate(smtpguard_smtp_connection_attempts_total"
                f"{{{VMSEL}}}[{RI}])))", "{{vm}}")], 0, 5),
        panel("Top VMs by distinct destinations (1m)", "timeseries",
              [(f'topk(10, max by (vm) (smtpguard_smtp_destinations{{{VMSEL}, window="1m"}}))',
                "{{vm}}")], 12, 5),
        panel("Blocked attempts /s by reason", "timeseries",
              [(f"sum by (reason) (rate(smtpguard_smtp_blocked_attempts_total{{{VMSEL}}}"
                f"[{RI}]))", "{{reason}}")], 0, 13, unit="ops"),
        panel("Handshake outcomes /s", "timeseries",
              [(f"sum by (outcome) (rate(smtpguard_smtp_handshakes_total{{{VMSEL}}}[{RI}]))",
                "{{outcome}}")], 12, 13, unit="ops"),
        panel("VM states over time", "timeseries",
              [(f"sum by (state) (smtpguard_vm_state{{{VMSEL}}})", "{{state}}")], 0, 21),
        panel("Enforcement actions", "timeseries",
              [(f"sum by (action) (increase(smtpguard_enforcement_actions_total{{{SEL}}}"
                f"[{RI}]))", "{{action}}")], 12, 21),
        row("Agent health", 29),
        panel("Detection loop p99", "timeseries",
              [(f"histogram_quantile(0.99, sum by (le, instance) "
                f"(rate(smtpguard_loop_duration_seconds_bucket{{{SEL}}}[{RI}])))",
                "{{instance}}")], 0, 30, 8, unit="s"),
        panel("Policy reloads", "timeseries",
              [(f"sum by (result) (increase(smtpguard_policy_reloads_total{{{SEL}}}[{RI}]))",
                "{{result}}"),
               (f"max by (instance) (smtpguard_policy_generation{{{SEL}}})",
                "generation {{instance}}")], 8, 30, 8),
        panel("Interfaces and BPF", "timeseries",
              [(f"sum by (instance) (smtpguard_interfaces_attached{{{SEL}}})",
                "attached {{instance}}"),
               (f"sum by (instance) (smtpguard_interfaces_unattached{{{SEL}}})",
                "unattached {{instance}}"),
               (f"min by (instance) (smtpguard_bpf_program_loaded{{{SEL}}})",
                "BPF loaded {{instance}}")], 16, 30, 8),
        panel("nftables set fill", "timeseries",
              [(f"max by (set) (smtpguard_nft_set_elements{{{SEL}}} / "
                f"smtpguard_nft_set_size{{{SEL}}})", "{{set}}")], 0, 38, 12, unit="percentunit"),
        panel("Agents", "stat",
              [(f'count by (version) (smtpguard_build_info{{{SEL}}})', "{{version}}")],
              12, 38, 12),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "smtpguard", "title": "smtpguard", "tags": ["smtpguard", "smtp", "abuse"],
        "schemaVersion": 39, "version": 1, "editable": True, "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Data source", "current": {}},
            {"name": "host", "type": "query", "label": "Host", "multi": True,
             "includeAll": True, "allValue": ".*",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(smtpguard_build_info, instance)",
                       "refId": "host"},
             "definition": "label_values(smtpguard_build_info, instance)", "refresh": 2},
            {"name": "vm", "type": "query", "label": "VM", "multi": True,
             "includeAll": True, "allValue": ".*",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": 'label_values(smtpguard_vm_state{instance=~"$host"}, vm)',
                       "refId": "vm"},
             "definition": 'label_values(smtpguard_vm_state{instance=~"$host"}, vm)',
             "refresh": 2},
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
