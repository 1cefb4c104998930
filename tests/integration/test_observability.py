"""The dashboard's and the alert rules' PromQL, evaluated by a real Prometheus
scraping a lab agent while a lab VM misbehaves; promtool on the rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology
from smtpguard.lab.traffic import fan_out

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "smtpguard.json"
RULES = ROOT / "alerts" / "smtpguard.rules.yml"
PROM = "127.0.0.1:9090"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    subprocess.run(["promtool", "check", "rules", str(RULES)], check=True, capture_output=True)
    out = subprocess.run(["promtool", "test", "rules", "tests.yml"], cwd=RULES.parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_json_is_generated_from_code() -> None:
    """dashboards/smtpguard.json is what dashboards/generate.py writes."""
    gen = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"])
    assert gen.returncode == 0, "run: python dashboards/generate.py"


def dashboard_queries() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[topology.Lab,
                                                                         AgentProc]]:
    """A lab whose agent a real Prometheus scrapes every second, after a VM
    fanned out (and got blocked) and another mailed normally."""
    require_root()
    tmp = tmp_path_factory.mktemp("prom")
    policy = tmp / "policy.yaml"
    policy.write_text("version: 1\nclasses:\n  default:\n    thresholds:\n"
                      "      - {name: fanout, metric: destinations, window: 1m, at_least: 50,"
                      " action: block, duration: 1h}\n"
                      "      - {name: volume, metric: attempts, window: 1m, at_least: 5,"
                      " action: flag}\n")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "smtpguard",
                            "static_configs": [{"targets": ["127.0.0.1:9725"]}]}],
    }))
    with lab_with_agent(tmp, 2, policy, enforce=True) as (lab, agent), \
            (tmp / "prometheus.log").open("wb") as plog:
        prom = subprocess.Popen(
            ["ip", "netns", "exec", lab.hv, "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address={PROM}"],
            stdout=subprocess.DEVNULL, stderr=plog)
        try:
            deadline = time.monotonic() + 30
            while not query(lab, "up").get("result"):
                assert time.monotonic() < deadline and prom.poll() is None, \
                    (tmp / "prometheus.log").read_text()[-2000:]
                time.sleep(0.5)
            send(lab, "vm2", 3, port=587, dialog="mail")
            send(lab, "vm1", 3, port=25, timeout=1)
            fan_out(lab.vm_ns("vm1"), 60, 40)
            agent.wait_event("vm.blocked", vm="vm1")
            send(lab, "vm1", 2, port=587, timeout=1)
            time.sleep(6)
            yield lab, agent
        finally:
            prom.terminate()
            prom.wait(10)


def query(lab: topology.Lab, expr: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        url = f"http://{PROM}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: dict[str, Any] = json.loads(r.read())
        except OSError:
            return {}
        assert body["status"] == "success", body
        return dict(body["data"])

    return run_in(lab.hv, get)


def concrete(expr: str) -> str:
    return expr.replace("$host", ".*").replace("$vm", ".*").replace("$__rate_interval", "30s")


@pytest.mark.parametrize("expr", dashboard_queries())
def test_every_dashboard_query_returns_data_of_the_expected_shape(scraped: Any,
                                                                   expr: str) -> None:
    """Each panel's query returns series, carrying the labels it groups by."""
    lab, _ = scraped
    data = query(lab, concrete(expr))
    assert data["resultType"] == "vector"
    assert data["result"], f"no data for {expr}"
    m = re.search(r"(?:by|max by|sum by|count by) \(([^)]*)\)", expr)
    if m:
        want = {x.strip() for x in m.group(1).split(",")} - {"le"}
        for series in data["result"]:
            assert want <= set(series["metric"]), (expr, series["metric"])


def test_dashboard_variables_resolve(scraped: Any) -> None:
    lab, _ = scraped
    d = json.loads(DASHBOARD.read_text())
    for var in d["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.match(r"label_values\((.*), (\w+)\)", var["query"])
        assert m, var
        data = query(lab, f"count by ({m.group(2)}) ({concrete(m.group(1))})")
        assert [s["metric"][m.group(2)] for s in data["result"]], var["name"]


@pytest.mark.parametrize("alert", sorted(rule_exprs()))
def test_every_alert_expression_evaluates(scraped: Any, alert: str) -> None:
    lab, _ = scraped
    data = query(lab, rule_exprs()[alert])
    assert data["resultType"] == "vector"
    firing = {"SmtpguardVmBlocked", "SmtpguardVmFlagged"}
    if alert == "SmtpguardVmBlocked":
        assert [s["metric"]["vm"] for s in data["result"]] == ["vm1"]
    elif alert not in firing:
        assert data["result"] == [], f"{alert} fires on a healthy agent: {data['result']}"
