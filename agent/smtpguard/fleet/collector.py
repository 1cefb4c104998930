"""The fleet's health for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from smtpguard.fleet.sync import FleetSync


class FleetCollector:
    def __init__(self, sync: FleetSync) -> None:
        self.sync = sync

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("smtpguard_fleet_etcd_up",
                               "1 when the last etcd operation succeeded, 0 otherwise")
        up.add_metric([], 1.0 if self.sync.etcd.up else 0.0)
        yield up
        q = GaugeMetricFamily("smtpguard_fleet_publish_queue",
                              "VM records decided here and not yet in etcd")
        q.add_metric([], float(self.sync.queued()))
        yield q
        err = CounterMetricFamily("smtpguard_fleet_errors", "failed etcd operations",
                                  labels=["op"])
        for op in ("range", "put", "lease"):
            err.add_metric([op], float(self.sync.etcd.errors.get(op, 0)))
        yield err
        moved = CounterMetricFamily("smtpguard_fleet_records",
                                    "VM records published to, or received from, the fleet",
                                    labels=["direction"])
        moved.add_metric(["published"], float(self.sync.published))
        moved.add_metric(["received"], float(self.sync.received))
        yield moved
