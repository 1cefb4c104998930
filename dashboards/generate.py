"""Generate the Grafana dashboards from this file, with Grafana's own
grafana-foundation-sdk builders (the schema current Grafana imports).

    python dashboards/generate.py            # rewrite smtpguard.json, smtpguard-fleet.json
    python dashboards/generate.py --check    # exit 1 if either is out of date

smtpguard.json: one site's hosts, from the agents' own series: a
${datasource} variable (Prometheus), a host selector (the scrape target's
`instance`) and a VM selector.

smtpguard-fleet.json: many hosts, from the recorded series of
alerts/smtpguard.recording.yml only (host:, host_vm:, tenant:), so it works
on a site's Prometheus and on a global one that federates (or receives by
remote write) just those; it needs the `host` label the scrape config adds
(see docs/metrics-and-dashboards.md).

Every query here is evaluated against a real Prometheus in the test suite
(tests/integration/test_observability.py, test_fleet_view.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

HERE = Path(__file__).parent
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'instance=~"$host"'
VMSEL = 'instance=~"$host", vm=~"$vm"'
RI = "$__rate_interval"
FSEL = 'host=~"$host"'


class Layout:
    """Panels in reading order: ids and grid positions handed out in turn."""

    def __init__(self, board: db.Dashboard) -> None:
        self.board = board
        self.id = 0
        self.x = self.y = self.h = 0

    def row(self, title: str) -> None:
        self.id += 1
        self.y += self.h
        self.board.with_row(db.Row(title).id(self.id).grid_pos(dm.GridPos(1, 24, 0, self.y)))
        self.x, self.y, self.h = 0, self.y + 1, 0

    def add(self, panel: stat.Panel | timeseries.Panel | table.Panel, w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.h = 0, self.y + self.h, 0
        self.id += 1
        self.board.with_panel(panel.id(self.id).datasource(DS)
                              .grid_pos(dm.GridPos(h, w, self.x, self.y)))
        self.x += w
        self.h = max(self.h, h)


def targets(exprs: list[tuple[str, str]]) -> list[prom.Dataquery]:
    return [prom.Dataquery().expr(e).legend_format(legend).ref_id(chr(65 + i))
            for i, (e, legend) in enumerate(exprs)]


def graph(title: str, exprs: list[tuple[str, str]], unit: str = "short",
          description: str = "") -> timeseries.Panel:
    return (timeseries.Panel().title(title).description(description).unit(unit)
            .targets(targets(exprs))  # type: ignore[arg-type]
            .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                    .placement(cm.LegendPlacement.RIGHT).show_legend(True)))


def single(title: str, exprs: list[tuple[str, str]], unit: str = "short",
           description: str = "") -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit)
            .targets(targets(exprs))  # type: ignore[arg-type]
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"])))


def top(title: str, expr: str, unit: str = "short", description: str = "") -> table.Panel:
    """An instant table (the top N now)."""
    q = prom.Dataquery().expr(expr).instant().format(pm.PromQueryFormat.TABLE).ref_id("A")
    return table.Panel().title(title).description(description).unit(unit).with_target(q)


def variable(name: str, label: str, query: str) -> db.QueryVariable:
    return (db.QueryVariable(name).label(label).datasource(DS).query(query).multi(True)
            .include_all(True).all_value(".*")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED))


def board(uid: str, title: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).tags(["smtpguard", "smtp", "abuse"]).editable()
            .timezone("browser").time("now-6h", "now").refresh("30s").version(1)
            .with_variable(db.DatasourceVariable("datasource").label("Data source")
                           .type("prometheus")))


def site() -> db.Dashboard:
    d = (board("smtpguard", "smtpguard")
         .with_variable(variable("host", "Host", "label_values(smtpguard_build_info, instance)"))
         .with_variable(variable("vm", "VM",
                                 'label_values(smtpguard_vm_state{instance=~"$host"}, vm)')))
    p = Layout(d)
    p.row("Fleet")
    p.add(single("VMs by state", [(f"sum by (state) (smtpguard_host_vms{{{SEL}}})", "{{state}}")],
                 description="All VMs on the chosen hosts, idle ones included"), 6, 4)
    p.add(single("VMs sending", [(f"sum(smtpguard_host_vms_sending{{{SEL}}})", "")],
                 description="VMs with an SMTP attempt within the exporter's window: "
                             "the only ones with per-VM series"), 6, 4)
    p.add(single("SMTP attempts /s",
                 [(f"sum(rate(smtpguard_host_smtp_connection_attempts_total{{{SEL}}}[{RI}]))",
                   "")], "ops"), 6, 4)
    p.add(single("Blocked attempts /s",
                 [(f"sum(rate(smtpguard_host_smtp_blocked_attempts_total{{{SEL}}}[{RI}]))",
                   "")], "ops"), 6, 4)
    p.add(graph("Top VMs by attempts /s",
                [(f"topk(10, sum by (vm) (rate(smtpguard_smtp_connection_attempts_total"
                  f"{{{VMSEL}}}[{RI}])))", "{{vm}}")]), 12, 8)
    p.add(graph("Top VMs by distinct destinations (1m)",
                [(f'topk(10, max by (vm) (smtpguard_smtp_destinations{{{VMSEL}, window="1m"}}))',
                  "{{vm}}")]), 12, 8)
    p.add(graph("Blocked attempts /s by reason",
                [(f"sum by (reason) (rate(smtpguard_smtp_blocked_attempts_total{{{VMSEL}}}"
                  f"[{RI}]))", "{{reason}}")], "ops"), 12, 8)
    p.add(graph("Handshake outcomes /s",
                [(f"sum by (outcome) (rate(smtpguard_smtp_handshakes_total{{{VMSEL}}}[{RI}]))",
                  "{{outcome}}")], "ops"), 12, 8)
    p.add(graph("VM states over time",
                [(f"sum by (state) (smtpguard_vm_state{{{VMSEL}}})", "{{state}}")],
                description="VMs with per-VM series (sending, or not ok)"), 12, 8)
    p.add(graph("Enforcement actions",
                [(f"sum by (action) (increase(smtpguard_enforcement_actions_total{{{SEL}}}"
                  f"[{RI}]))", "{{action}}")]), 12, 8)
    p.row("Agent health")
    p.add(graph("Detection loop p99",
                [(f"histogram_quantile(0.99, sum by (le, instance) "
                  f"(rate(smtpguard_loop_duration_seconds_bucket{{{SEL}}}[{RI}])))",
                  "{{instance}}")], "s"), 8, 8)
    p.add(graph("Policy reloads",
                [(f"sum by (result) (increase(smtpguard_policy_reloads_total{{{SEL}}}[{RI}]))",
                  "{{result}}"),
                 (f"max by (instance) (smtpguard_policy_generation{{{SEL}}})",
                  "generation {{instance}}")]), 8, 8)
    p.add(graph("Interfaces and BPF",
                [(f"sum by (instance) (smtpguard_interfaces_attached{{{SEL}}})",
                  "attached {{instance}}"),
                 (f"sum by (instance) (smtpguard_interfaces_unattached{{{SEL}}})",
                  "unattached {{instance}}"),
                 (f"min by (instance) (smtpguard_bpf_program_loaded{{{SEL}}})",
                  "BPF loaded {{instance}}")]), 8, 8)
    p.add(graph("nftables set fill",
                [(f"max by (set) (smtpguard_nft_set_elements{{{SEL}}} / "
                  f"smtpguard_nft_set_size{{{SEL}}})", "{{set}}")], "percentunit"), 12, 8)
    p.add(single("Agents",
                 [(f"count by (version) (smtpguard_build_info{{{SEL}}})", "{{version}}")]),
          12, 8)
    return d


def fleet() -> db.Dashboard:
    d = (board("smtpguard-fleet", "smtpguard fleet")
         .with_variable(variable("host", "Host",
                                 "label_values(host:smtpguard_build_info:max, host)")))
    p = Layout(d)
    p.row("Hosts")
    p.add(single("Hosts answering",
                 [(f"sum(host:smtpguard_up:max{{{FSEL}}})", "up"),
                  (f"count(host:smtpguard_up:max{{{FSEL}}})", "known")]), 6, 4)
    p.add(single("VMs by state",
                 [(f"sum by (state) (host:smtpguard_vms:sum{{{FSEL}}})", "{{state}}")]), 6, 4)
    p.add(single("VMs sending",
                 [(f"sum(host:smtpguard_vms_sending:sum{{{FSEL}}})", "")]), 6, 4)
    p.add(single("SMTP attempts /s, fleet",
                 [(f"sum(host:smtpguard_smtp_connection_attempts:rate5m{{{FSEL}}})", "")],
                 "ops"), 6, 4)
    p.add(graph("Attempts /s by host (top 20)",
                [(f"topk(20, host:smtpguard_smtp_connection_attempts:rate5m{{{FSEL}}})",
                  "{{host}}")], "ops"), 12, 8)
    p.add(graph("Blocked attempts /s by host (top 20)",
                [(f"topk(20, sum by (host) "
                  f"(host:smtpguard_smtp_blocked_attempts:rate5m{{{FSEL}}}))", "{{host}}")],
                "ops"), 12, 8)
    p.add(graph("Blocked attempts /s by reason, fleet",
                [(f"sum by (reason) (host:smtpguard_smtp_blocked_attempts:rate5m{{{FSEL}}})",
                  "{{reason}}")], "ops"), 12, 8)
    p.add(graph("Handshake outcomes /s, fleet",
                [(f"sum by (outcome) (host:smtpguard_smtp_handshakes:rate5m{{{FSEL}}})",
                  "{{outcome}}")], "ops"), 12, 8)
    p.row("Top VMs and tenants, fleet-wide")
    p.add(top("Top VMs by attempts /s",
              f"topk(20, host_vm:smtpguard_smtp_connection_attempts:rate5m{{{FSEL}}})", "ops",
              "Only VMs that send mail have per-VM series, so this stays small"), 8, 10)
    p.add(top("Top VMs by distinct destinations (1m)",
              f"topk(20, host_vm:smtpguard_smtp_destinations_1m:max{{{FSEL}}})"), 8, 10)
    p.add(top("Top tenants by attempts /s",
              "topk(20, tenant:smtpguard_smtp_connection_attempts:rate5m)", "ops",
              "Over all hosts (a tenant's VMs on every host together)"), 8, 10)
    p.add(graph("Blocked VMs by host (top 20)",
                [(f'topk(20, host:smtpguard_vms:sum{{{FSEL}, state="blocked"}})', "{{host}}")]),
          12, 8)
    p.add(graph("Distinct destinations per host (1h, top 20)",
                [(f'topk(20, host:smtpguard_smtp_destinations:max{{{FSEL}, window="1h"}})',
                  "{{host}}")]), 12, 8)
    p.row("etcd and agents")
    p.add(single("Hosts reaching etcd",
                 [(f"sum(host:smtpguard_fleet_etcd_up:min{{{FSEL}}})", "up"),
                  (f"count(host:smtpguard_fleet_etcd_up:min{{{FSEL}}})", "with a fleet")]),
          6, 4)
    p.add(graph("Hosts without etcd",
                [(f"host:smtpguard_fleet_etcd_up:min{{{FSEL}}} == 0", "{{host}}")]), 6, 8)
    p.add(graph("Publish queue (records waiting)",
                [(f"topk(20, host:smtpguard_fleet_publish_queue:max{{{FSEL}}})", "{{host}}")]),
          6, 8)
    p.add(graph("etcd errors /s by operation",
                [(f"sum by (op) (host:smtpguard_fleet_errors:rate5m{{{FSEL}}})", "{{op}}")],
                "ops"), 6, 8)
    p.add(graph("Detection loop p99 (top 20 hosts)",
                [(f"topk(20, host:smtpguard_loop_duration_seconds:p99_5m{{{FSEL}}})",
                  "{{host}}")], "s"), 12, 8)
    p.add(single("Agents by version",
                 [(f"count by (version) (host:smtpguard_build_info:max{{{FSEL}}})",
                   "{{version}}")]), 12, 8)
    return d


BOARDS = {"smtpguard.json": site, "smtpguard-fleet.json": fleet}


def render(make: str) -> str:
    return json.dumps(BOARDS[make]().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    stale = [n for n in BOARDS if not (HERE / n).exists() or (HERE / n).read_text() != render(n)]
    if "--check" in sys.argv:
        sys.exit(1 if stale else 0)
    for name in BOARDS:
        (HERE / name).write_text(render(name))
