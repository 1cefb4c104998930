"""The fleet view on a real Prometheus scraping three real agents, each in
its own lab: every query of both dashboards and every alert and recording
rule evaluates; the bounded-series rule holds on the real exporter."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import METRICS, AgentProc, require_root, send, unique
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology
from smtpguard.lab.traffic import fan_out

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
DASHBOARDS = {name: ROOT / "dashboards" / name
              for name in ("smtpguard.json", "smtpguard-fleet.json")}
RULE_FILES = [ALERTS / "smtpguard.rules.yml", ALERTS / "smtpguard.recording.yml",
              ALERTS / "smtpguard.fleet.rules.yml"]
HOSTS = ("hv0", "hv1", "hv2")
PROM = "127.0.0.1:9090"
# The agents run without a fleet section: etcd's series are absent, so the
# queries on them evaluate to nothing (without error).
NO_FLEET = "smtpguard_fleet_"


def addr(i: int, side: int) -> str:
    """The link from Prometheus (side 1) to host i's hypervisor (side 2)."""
    return f"198.18.{200 + i}.{side}"


class ReachableAgent(AgentProc):
    """An agent whose /metrics listens on every address of its hypervisor
    namespace (127.0.0.1 included, for metrics()), so Prometheus can reach it."""

    def args(self) -> list[str]:
        return ["0.0.0.0:9725" if a == METRICS else a for a in super().args()]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def alias(lab: topology.Lab, ifname: str, text: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute(netns=lab.hv) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], ifalias=text)


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def every_rule() -> dict[str, tuple[str, str]]:
    """alert or record name -> (its file, its expression)."""
    return {r.get("alert") or r["record"]: (p.name, r["expr"])
            for p in RULE_FILES for r in rules(p)}


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for name, path in DASHBOARDS.items():
        d = json.loads(path.read_text())
        out += [(name, t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    return out


def query(ns: str, expr: str) -> dict[str, Any]:
    return api(ns, "query?" + urllib.parse.urlencode({"query": expr}))


def api(ns: str, path: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://{PROM}/api/v1/{path}", timeout=5) as r:
                body: dict[str, Any] = json.loads(r.read())
        except OSError:
            return {}
        assert body["status"] == "success", body
        return dict(body["data"])

    return run_in(ns, get)


def concrete(expr: str) -> str:
    return expr.replace("$host", ".*").replace("$vm", ".*").replace("$__rate_interval", "30s")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[
        tuple[topology.Lab, AgentProc]]]]:
    """Three labs (hosts hv0-hv2), each with a real agent and two VMs: vmN
    "<host>-mailer" (tenant acme) sends, "<host>-idle" (tenant globex) never
    does. A Prometheus in a namespace of its own, linked to each hypervisor
    by a veth pair, scrapes them every second with the `host` label added by
    relabelling, and evaluates every rule file every second. On hv0 the
    mailer sends mail, on hv1 it fans out and is blocked, on hv2 it tries
    port 25 (rejected) and 587; then each sends twice more."""
    require_root()
    tmp = tmp_path_factory.mktemp("fleetview")
    prefix = unique("sgf")
    prom_ns = f"{prefix}-prom"
    policy = tmp / "policy.yaml"
    policy.write_text("version: 1\nclasses:\n  default:\n    thresholds:\n"
                      "      - {name: fanout, metric: destinations, window: 1m, at_least: 50,"
                      " action: block, duration: 1h}\n"
                      "      - {name: volume, metric: attempts, window: 1m, at_least: 5,"
                      " action: flag}\n")
    # The same rules, every second instead of every 30 s.
    rule_paths = []
    for p in RULE_FILES:
        doc = yaml.safe_load(p.read_text())
        for g in doc["groups"]:
            g["interval"] = "1s"
        (tmp / p.name).write_text(yaml.safe_dump(doc))
        rule_paths.append(str(tmp / p.name))
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_paths,
        "scrape_configs": [{
            "job_name": "smtpguard",
            "static_configs": [{"targets": [f"{addr(i, 2)}:9725" for i in range(len(HOSTS))]}],
            # What a fleet's scrape config does: a host label from the target.
            "relabel_configs": [{"source_labels": ["__address__"],
                                 "regex": r"198\.18\.20(\d)\.2:9725",
                                 "replacement": "hv$1", "target_label": "host"}]}],
    }))
    agents: list[tuple[topology.Lab, AgentProc]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(subprocess.run, ["ip", "netns", "del", prom_ns], capture_output=True)
        ip("netns", "add", prom_ns)
        ip("-n", prom_ns, "link", "set", "lo", "up")
        for i, host in enumerate(HOSTS):
            lab = topology.Lab(unique())
            (tmp / host).mkdir()
            agent = ReachableAgent(lab, tmp / host, policy, enforce=True)
            stack.callback(topology.down, lab)
            stack.callback(agent.cleanup)
            stack.callback(agent.stop)
            topology.up(lab, 2)
            alias(lab, "veth-vm1", f"vm={host}-mailer tenant=acme")
            alias(lab, "veth-vm2", f"vm={host}-idle tenant=globex")
            there, here = f"{prefix}h{i}", f"{prefix}p{i}"
            ip("-n", prom_ns, "link", "add", here, "type", "veth", "peer", "name", there,
               "netns", lab.hv)
            ip("-n", prom_ns, "addr", "add", f"{addr(i, 1)}/30", "dev", here)
            ip("-n", lab.hv, "addr", "add", f"{addr(i, 2)}/30", "dev", there)
            ip("-n", prom_ns, "link", "set", here, "up")
            ip("-n", lab.hv, "link", "set", there, "up")
            agent.start()
            agents.append((lab, agent))
        plog = stack.enter_context((tmp / "prometheus.log").open("wb"))
        prom = subprocess.Popen(
            ["ip", "netns", "exec", prom_ns, "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address={PROM}"],
            stdout=subprocess.DEVNULL, stderr=plog)
        stack.callback(prom.wait, 10)
        stack.callback(prom.terminate)

        def until(expr: str, n: int, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while len(query(prom_ns, expr).get("result", [])) < n:
                assert time.monotonic() < deadline and prom.poll() is None, \
                    f"{expr}: fewer than {n} series\n" + \
                    (tmp / "prometheus.log").read_text()[-2000:]
                time.sleep(0.5)

        until('up{job="smtpguard"} == 1', len(HOSTS))
        (lab0, _), (lab1, agent1), (lab2, _) = agents
        send(lab0, "vm1", 3, port=587, dialog="mail")
        fan_out(lab1.vm_ns("vm1"), 60, 40)
        agent1.wait_event("vm.blocked", vm="hv1-mailer")
        send(lab1, "vm1", 2, port=587, timeout=1)
        send(lab2, "vm1", 3, port=25, timeout=1)
        send(lab2, "vm1", 2, port=587, dialog="mail")
        # A VM's series appear with its first attempts, at their count:
        # rate() sees what it sends from then on (the host totals, all).
        until('smtpguard_smtp_connection_attempts_total{vm=~".*-mailer"}', len(HOSTS))
        for lab in (lab0, lab1, lab2):
            send(lab, "vm1", 2, port=587, dialog="mail", timeout=1)
        until("host:smtpguard_smtp_connection_attempts:rate5m > 0", len(HOSTS))
        until("host_vm:smtpguard_smtp_connection_attempts:rate5m > 0", len(HOSTS))
        until('host:smtpguard_smtp_blocked_attempts:rate5m > 0', 2)
        until("tenant:smtpguard_smtp_connection_attempts:rate5m", 1)
        time.sleep(3)
        yield prom_ns, agents


def test_promtool_checks_and_unit_tests_the_fleet_rules() -> None:
    """The recording and fleet alert rules are valid and behave as their
    promtool tests say (alerts/fleet-tests.yml)."""
    out = subprocess.run(["promtool", "check", "rules", *map(str, RULE_FILES)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["promtool", "test", "rules", "fleet-tests.yml"], cwd=ALERTS,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_idle_vm_exports_nothing_per_vm_and_the_host_totals_are_there(fleet: Any) -> None:
    """On every real agent: no series carries the idle VM's id (no state,
    info or counters); the host totals count both VMs; the mailer has its
    per-VM series. Prometheus holds no series of any idle VM."""
    prom_ns, agents = fleet
    for (_, agent), host in zip(agents, HOSTS, strict=True):
        m = agent.metrics()
        idle = [(name, k) for name, fam in m.items() for k in fam
                if ("vm", f"{host}-idle") in k]
        assert idle == [], idle
        assert sum(m["smtpguard_host_vms"].values()) == 2
        assert m["smtpguard_host_vms_sending"][()] == 1
        assert sum(m["smtpguard_host_smtp_connection_attempts_total"].values()) > 0
        assert (("name", f"{host}-mailer"), ("source", "ifalias"), ("tenant", "acme"),
                ("vm", f"{host}-mailer")) in m["smtpguard_vm_info"], m["smtpguard_vm_info"]
        assert agent.counter("smtpguard_smtp_connection_attempts_total",
                             vm=f"{host}-mailer") > 0
    assert query(prom_ns, '{vm=~".*-idle"}')["result"] == []
    hosts = query(prom_ns, "count by (host) (smtpguard_host_smtp_connection_attempts_total)")
    assert sorted(s["metric"]["host"] for s in hosts["result"]) == list(HOSTS)


@pytest.mark.parametrize(("board", "expr"), dashboard_queries())
def test_every_query_of_both_dashboards_evaluates(fleet: Any, board: str, expr: str) -> None:
    """Each panel's query evaluates without error and returns series carrying
    the labels it groups by (etcd's: nothing, these agents have no fleet)."""
    prom_ns, _ = fleet
    data = query(prom_ns, concrete(expr))
    assert data["resultType"] == "vector"
    if NO_FLEET in expr:
        return
    assert data["result"], f"no data for {expr}"
    m = re.search(r"(?:by|max by|sum by|count by) \(([^)]*)\)", expr)
    want = {x.strip() for x in m.group(1).split(",")} - {"le"} if m else set()
    if re.search(r"host_vm:|topk\(20, host:", expr):
        want.add("host")
    for series in data["result"]:
        assert want <= set(series["metric"]), (expr, series["metric"])


@pytest.mark.parametrize("board", sorted(DASHBOARDS))
def test_dashboard_variables_resolve(fleet: Any, board: str) -> None:
    prom_ns, _ = fleet
    d = json.loads(DASHBOARDS[board].read_text())
    for var in d["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.match(r"label_values\((.*), (\w+)\)", var["query"])
        assert m, var
        data = query(prom_ns, f"count by ({m.group(2)}) ({concrete(m.group(1))})")
        values = sorted(s["metric"][m.group(2)] for s in data["result"])
        assert values, var["name"]
        if m.group(2) == "host":
            assert values == list(HOSTS)


@pytest.mark.parametrize("name", sorted(every_rule()))
def test_every_rule_expression_evaluates(fleet: Any, name: str) -> None:
    """Every alert and recording rule evaluates without error, in our query
    and in Prometheus' own rule evaluation; recording rules record data
    (etcd's aside); only the alerts that should fire do."""
    prom_ns, _ = fleet
    path, expr = every_rule()[name]
    data = query(prom_ns, expr)
    assert data["resultType"] == "vector"
    evaluated = [r for g in api(prom_ns, "rules")["groups"] for r in g["rules"]
                 if r["name"] == name]
    assert evaluated and all(r["health"] == "ok" for r in evaluated), evaluated
    if ":" in name:  # a recording rule
        if NO_FLEET not in expr:
            assert data["result"], f"{name} records nothing"
            assert all("host" in s["metric"] or name.startswith("tenant:")
                       for s in data["result"]), data["result"]
    elif name == "SmtpguardVmBlocked":
        assert [s["metric"]["vm"] for s in data["result"]] == ["hv1-mailer"]
    elif name != "SmtpguardVmFlagged":
        assert data["result"] == [], f"{name} fires on a healthy fleet: {data['result']}"
