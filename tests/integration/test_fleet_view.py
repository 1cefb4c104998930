"""The fleet view on a real Prometheus scraping three real agents in fleet
mode (a real etcd), each in its own lab: every recording rule and every query
of the fleet dashboard returns the series and values this fleet must give
(hosts up, a blocked VM counted, the host cut off from etcd); every query of
the site dashboard and every alert evaluates; the bounded-series rule holds on
the real exporter."""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetkit import URL, EtcdKit

from conftest import METRICS, AgentProc, require_root, send, unique
from smtpguard.daemon.netns import run_in
from smtpguard.datapath.snapshot import WINDOWS
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
POLICY = """version: 1
classes:
  default:
    thresholds:
      - {{name: fanout, metric: destinations, window: 1m, at_least: 50, action: block,
         duration: 1h}}
      - {{name: volume, metric: attempts, window: 1m, at_least: 5, action: flag}}
fleet:
  endpoints: ["{url}"]
  prefix: {prefix}
  host: {host}
"""
CUT_OFF = "hv2"  # in fleet mode, its management link to etcd never wired


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


def dashboard_queries(*boards: str) -> list[tuple[str, str]]:
    out = []
    for name in boards or DASHBOARDS:
        d = json.loads(DASHBOARDS[name].read_text())
        out += [(name, t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    return out


def query(ns: str, expr: str) -> dict[str, Any]:
    return api(ns, "query?" + urllib.parse.urlencode({"query": expr}))


def api(ns: str, path: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://{PROM}/api/v1/{path}", timeout=10) as r:
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
    """Three labs (hosts hv0-hv2), each with a real agent in fleet mode and
    two VMs: vmN "<host>-mailer" (tenant acme) sends, "<host>-idle" (tenant
    globex) never does. hv0 and hv1 reach a real etcd (fleetkit); hv2's
    management link is never wired, so it runs cut off from it. A Prometheus
    in a namespace of its own, linked to each hypervisor by a veth pair,
    scrapes them every second with the `host` label added by relabelling,
    and evaluates every rule file every second. On hv0 the mailer sends mail,
    on hv1 it fans out and is blocked (and published to etcd), on hv2 it
    tries port 25 (rejected) and 587; then each sends twice more."""
    require_root()
    tmp = tmp_path_factory.mktemp("fleetview")
    prefix = unique("sgf")
    prom_ns = f"{prefix}-prom"
    kit = EtcdKit(prefix)
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
        stack.callback(kit.down)
        kit.up()
        stack.callback(subprocess.run, ["ip", "netns", "del", prom_ns], capture_output=True)
        ip("netns", "add", prom_ns)
        ip("-n", prom_ns, "link", "set", "lo", "up")
        for i, host in enumerate(HOSTS):
            lab = topology.Lab(unique())
            (tmp / host).mkdir()
            policy = tmp / host / "policy.yaml"
            policy.write_text(POLICY.format(url=URL, prefix=kit.prefix, host=host))
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
            if host != CUT_OFF:
                kit.connect(lab, i + 1)
            agent.start()
            agents.append((lab, agent))
        for (_, agent), host in zip(agents, HOSTS, strict=True):
            agent.wait_event("fleet.unavailable" if host == CUT_OFF else "fleet.connected",
                             timeout=60)
        plog = stack.enter_context((tmp / "prometheus.log").open("wb"))
        prom = subprocess.Popen(
            ["ip", "netns", "exec", prom_ns, "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address={PROM}"],
            stdout=subprocess.DEVNULL, stderr=plog)
        stack.callback(prom.wait, 10)
        stack.callback(prom.terminate)

        def until(expr: str, n: int, timeout: float = 120) -> None:
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
        # What the value checks need settled: every host's loop histogram
        # and fleet series recorded, hv1's block published (its queue empty).
        until("host:smtpguard_loop_duration_seconds:p99_5m > 0", len(HOSTS))
        until('host:smtpguard_smtp_handshakes:rate5m{outcome="completed"} > 0', 2)
        until('host:smtpguard_smtp_blocked_attempts:rate5m{host="hv1", reason="block"} > 0', 1)
        until('host:smtpguard_smtp_blocked_attempts:rate5m{host="hv2", reason="port25"} > 0', 1)
        until("host_vm:smtpguard_vm_blocked:max", 1)
        until("host:smtpguard_fleet_etcd_up:min == 1", len(HOSTS) - 1)
        until(f'host:smtpguard_fleet_etcd_up:min{{host="{CUT_OFF}"}} == 0', 1)
        until(f'host:smtpguard_fleet_errors:rate5m{{host="{CUT_OFF}", op="lease"}} > 0', 1)
        until(f'host:smtpguard_fleet_publish_queue:max{{host!="{CUT_OFF}"}} == 0',
              len(HOSTS) - 1)
        assert kit.get(f"{kit.prefix}/vms/hv1-mailer")["state"] == "blocked"  # type: ignore[index]
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
        assert sum(m["smtpguard_host_vms"].values()) >= 2
        assert m["smtpguard_host_vms_sending"][()] == 1
        assert sum(m["smtpguard_host_smtp_connection_attempts_total"].values()) > 0
        assert (("name", f"{host}-mailer"), ("source", "ifalias"), ("tenant", "acme"),
                ("vm", f"{host}-mailer")) in m["smtpguard_vm_info"], m["smtpguard_vm_info"]
        assert agent.counter("smtpguard_smtp_connection_attempts_total",
                             vm=f"{host}-mailer") > 0
    assert query(prom_ns, '{vm=~".*-idle"}')["result"] == []
    hosts = query(prom_ns, "count by (host) (smtpguard_host_smtp_connection_attempts_total)")
    assert sorted(s["metric"]["host"] for s in hosts["result"]) == list(HOSTS)


def test_each_host_counts_its_own_vms_only(fleet: Any) -> None:
    """smtpguard_host_vms is every VM on the host: its two, not the blocked
    VM of another host whose record it adopted from etcd."""
    _, agents = fleet
    counts = {host: agent.metrics()["smtpguard_host_vms"]
              for (_, agent), host in zip(agents, HOSTS, strict=True)}
    assert {h: sum(c.values()) for h, c in counts.items()} == dict.fromkeys(HOSTS, 2), counts


@pytest.mark.parametrize(("board", "expr"), dashboard_queries())
def test_every_query_of_both_dashboards_evaluates(fleet: Any, board: str, expr: str) -> None:
    """Each panel's query evaluates without error and returns series carrying
    the labels it groups by (the fleet board's values: below)."""
    prom_ns, _ = fleet
    data = query(prom_ns, concrete(expr))
    assert data["resultType"] == "vector"
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
    (their values: below); only the alerts that should fire do."""
    prom_ns, _ = fleet
    path, expr = every_rule()[name]
    data = query(prom_ns, expr)
    assert data["resultType"] == "vector"
    evaluated = [r for g in api(prom_ns, "rules")["groups"] for r in g["rules"]
                 if r["name"] == name]
    assert evaluated and all(r["health"] == "ok" for r in evaluated), evaluated
    if ":" in name:  # a recording rule
        assert data["result"], f"{name} records nothing"
        assert all("host" in s["metric"] or name.startswith("tenant:")
                   for s in data["result"]), data["result"]
    elif name == "SmtpguardVmBlocked":
        assert [s["metric"]["vm"] for s in data["result"]] == ["hv1-mailer"]
    elif name == "SmtpguardHostEtcdUnreachable":  # its `for` aside: the one host cut off
        assert [s["metric"]["host"] for s in data["result"]] == [CUT_OFF]
    elif name != "SmtpguardVmFlagged":
        assert data["result"] == [], f"{name} fires on a healthy fleet: {data['result']}"


# -- what each recorded series and fleet panel must give on this fleet ------
# Specs: the labels a result is keyed by, and for each key its value: a
# number (exactly), a (low, high) range (a rate, a latency), or a check of
# the whole {key: value} map. The keys must be exactly those listed.
POS, ANY = (1e-9, math.inf), (0.0, math.inf)
STATES = ("ok", "flagged", "throttled", "blocked")
OPS = ("lease", "put", "range")
REASONS = ("block", "limit", "port25", "throttle")
Expect = float | tuple[float, float]
Spec = tuple[tuple[str, ...], dict[Any, Expect] | Callable[[dict[Any, float]], object]]


def each_host(value: Expect, **hosts: Expect) -> dict[Any, Expect]:
    return {h: hosts.get(h, value) for h in HOSTS}


def vms_by_state(got: dict[Any, float]) -> None:
    """Every host's two VMs, each in one state; hv1's mailer blocked."""
    assert set(got) == {(h, s) for h in HOSTS for s in STATES}, got
    assert {h: sum(v for (hh, _), v in got.items() if hh == h) for h in HOSTS} == \
        dict.fromkeys(HOSTS, 2), got
    assert {h: got[h, "blocked"] for h in HOSTS} == {"hv0": 0, "hv1": 1, "hv2": 0}, got
    assert all(got[h, "throttled"] == 0 for h in HOSTS), got


def destinations(got: dict[Any, float]) -> None:
    """hv1 fanned out to 60 addresses (its block fired at 50 in a minute);
    the others mailed one sink."""
    assert set(got) == {(h, w) for h in HOSTS for w in WINDOWS}, got
    assert 40 <= got["hv1", "1h"] <= 80, got
    assert all(0.5 <= got[h, "1h"] <= 5 for h in ("hv0", "hv2")), got
    assert all(v >= 0 for v in got.values()), got


MAILERS = {(h, f"{h}-mailer") for h in HOSTS}
RECORDED: dict[str, Spec] = {
    "host:smtpguard_up:max": (("host",), each_host(1)),
    "host:smtpguard_build_info:max": (("host",), each_host(1)),
    "host:smtpguard_vms:sum": (("host", "state"), vms_by_state),
    "host:smtpguard_vms_sending:sum": (("host",), each_host(1)),
    "host:smtpguard_smtp_connection_attempts:rate5m": (("host",), each_host(POS)),
    # hv1's mailer sent to 587 only (refused once blocked; its fan-out at 40/s
    # may also meet the default ceiling), hv2's to 25 and 587 (25 refused),
    # hv0's only mail that went through: every other rate 0.
    "host:smtpguard_smtp_blocked_attempts:rate5m": (
        ("host", "reason"), {(h, r): {("hv1", "block"): POS, ("hv2", "port25"): POS,
                                      ("hv1", "limit"): ANY}.get((h, r), 0)
                             for h in HOSTS for r in REASONS}),
    "host:smtpguard_smtp_handshakes:rate5m": (
        ("host", "outcome"), lambda got: _at_least(
            got, {("hv0", "completed"): POS, ("hv2", "completed"): POS})),
    "host:smtpguard_smtp_destinations:max": (("host", "window"), destinations),
    "host:smtpguard_loop_duration_seconds:p99_5m": (("host",), each_host((1e-6, 10))),
    "host:smtpguard_last_loop_age_seconds:max": (("host",), each_host((-1, 60))),
    "host:smtpguard_interfaces_unattached:sum": (("host",), each_host(0)),
    "host:smtpguard_fleet_etcd_up:min": (("host",), each_host(1, hv2=0)),
    "host:smtpguard_fleet_publish_queue:max": (("host",), each_host(0, hv2=(0, 10))),
    "host:smtpguard_fleet_errors:rate5m": (
        ("host", "op"), {(h, op): POS if (h, op) == (CUT_OFF, "lease") else ANY
                         for h in HOSTS for op in OPS}),
    "host_vm:smtpguard_smtp_connection_attempts:rate5m": (
        ("host", "vm"), dict.fromkeys(MAILERS, POS)),
    "host_vm:smtpguard_smtp_destinations_1m:max": (
        ("host", "vm"), dict.fromkeys(MAILERS, (0, 80))),
    "host_vm:smtpguard_vm_blocked:max": (("host", "vm"), {("hv1", "hv1-mailer"): 1}),
    "tenant:smtpguard_smtp_connection_attempts:rate5m": (("tenant",), {("acme",): POS}),
}
# The fleet dashboard's panels: the sums of the above.
F = 'host=~"$host"'
PANELS: dict[str, Spec] = {
    f"sum(host:smtpguard_up:max{{{F}}})": ((), {(): len(HOSTS)}),
    f"count(host:smtpguard_up:max{{{F}}})": ((), {(): len(HOSTS)}),
    f"sum by (state) (host:smtpguard_vms:sum{{{F}}})": (
        ("state",), lambda got: (
            _at_least(got, {("blocked",): 1, ("throttled",): 0}),
            _equal(sum(got.values()), 2 * len(HOSTS), got))),
    f"sum(host:smtpguard_vms_sending:sum{{{F}}})": ((), {(): len(HOSTS)}),
    f"sum(host:smtpguard_smtp_connection_attempts:rate5m{{{F}}})": ((), {(): POS}),
    f"topk(20, host:smtpguard_smtp_connection_attempts:rate5m{{{F}}})": (
        ("host",), each_host(POS)),
    f"topk(20, sum by (host) (host:smtpguard_smtp_blocked_attempts:rate5m{{{F}}}))": (
        ("host",), each_host(POS, hv0=0)),
    f"sum by (reason) (host:smtpguard_smtp_blocked_attempts:rate5m{{{F}}})": (
        ("reason",), lambda got: _at_least(got, {("block",): POS, ("port25",): POS})),
    f"sum by (outcome) (host:smtpguard_smtp_handshakes:rate5m{{{F}}})": (
        ("outcome",), lambda got: (_equal(set(got), {("completed",), ("reset",),
                                                       ("no_answer",)}, got),
                                   _at_least(got, {("completed",): POS}))),
    f"topk(20, host_vm:smtpguard_smtp_connection_attempts:rate5m{{{F}}})": (
        ("host", "vm"), dict.fromkeys(MAILERS, POS)),
    f"topk(20, host_vm:smtpguard_smtp_destinations_1m:max{{{F}}})": (
        ("host", "vm"), dict.fromkeys(MAILERS, (0, 80))),
    "topk(20, tenant:smtpguard_smtp_connection_attempts:rate5m)": (
        ("tenant",), {("acme",): POS}),
    f'topk(20, host:smtpguard_vms:sum{{{F}, state="blocked"}})': (
        ("host",), each_host(0, hv1=1)),
    f'topk(20, host:smtpguard_smtp_destinations:max{{{F}, window="1h"}})': (
        ("host",), each_host((0.5, 5), hv1=(40, 80))),
    f"sum(host:smtpguard_fleet_etcd_up:min{{{F}}})": ((), {(): len(HOSTS) - 1}),
    f"count(host:smtpguard_fleet_etcd_up:min{{{F}}})": ((), {(): len(HOSTS)}),
    f"host:smtpguard_fleet_etcd_up:min{{{F}}} == 0": (("host",), {CUT_OFF: 0}),
    f"topk(20, host:smtpguard_fleet_publish_queue:max{{{F}}})": (
        ("host",), each_host(0, hv2=(0, 10))),
    f"sum by (op) (host:smtpguard_fleet_errors:rate5m{{{F}}})": (
        ("op",), {(op,): POS if op == "lease" else ANY for op in OPS}),
    f"topk(20, host:smtpguard_loop_duration_seconds:p99_5m{{{F}}})": (
        ("host",), each_host((1e-6, 10))),
    f"count by (version) (host:smtpguard_build_info:max{{{F}}})": (
        ("version",), lambda got: _equal(list(got.values()), [len(HOSTS)], got)),
}
def _equal(got: Any, want: Any, context: Any) -> None:
    assert got == want, context


def _at_least(got: dict[Any, float], want: dict[Any, Expect]) -> None:
    for key, expect in want.items():
        assert key in got, (key, got)
        _check(got[key], expect, key, got)


def _check(value: float, expect: Expect, key: Any, got: Any) -> None:
    if isinstance(expect, tuple):
        lo, hi = expect
        assert lo <= value <= hi, (key, value, expect, got)
    else:
        assert math.isclose(value, expect, abs_tol=1e-9), (key, value, expect, got)


def keyed(result: list[dict[str, Any]], labels: tuple[str, ...]) -> dict[Any, float]:
    """{label values (a host alone: the host): value} of an instant vector."""
    out: dict[Any, float] = {}
    for s in result:
        key = tuple(s["metric"].get(name, "") for name in labels)
        assert key not in out, (labels, result)
        out[key[0] if len(labels) == 1 and labels[0] == "host" else key] = float(s["value"][1])
    return out


def expect(prom_ns: str, expr: str, spec: Spec) -> None:
    labels, want = spec
    got = keyed(query(prom_ns, expr)["result"], labels)
    assert got, f"no data for {expr}"
    if callable(want):
        want(got)
        return
    assert set(got) == set(want), (expr, got)
    for key, value in got.items():
        _check(value, want[key], key, (expr, got))


def test_every_recording_rule_and_fleet_panel_has_a_value_spec() -> None:
    """No recorded series or fleet panel goes without the check below."""
    assert set(RECORDED) == {n for n in every_rule() if ":" in n}
    assert set(PANELS) == {e for _, e in dashboard_queries("smtpguard-fleet.json")}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_every_recording_rule_records_this_fleets_values(fleet: Any, name: str) -> None:
    """Each recorded series, from real agents in fleet mode: the hosts up,
    each host's VMs by state with hv1's blocked mailer, rates above zero where
    mail went, hv2's etcd down and its lease errors, the others' etcd up with
    nothing left to publish."""
    prom_ns, _ = fleet
    expect(prom_ns, name, RECORDED[name])


@pytest.mark.parametrize("expr", sorted(PANELS))
def test_every_fleet_panel_shows_this_fleets_values(fleet: Any, expr: str) -> None:
    """Each query of the fleet dashboard (all hosts selected): 3 hosts
    answering, 2 reaching etcd, the one without it named, one VM blocked."""
    prom_ns, _ = fleet
    expect(prom_ns, concrete(expr), PANELS[expr])
