"""The trip wires (datapath/trip.py) on /metrics, per host:

    smtpguard_trip_wires{state="armed"} 998.0
    smtpguard_trip_wires{state="tripped"} 0.0

A tripped wire lasts from the crossing attempt to the agent's block (its
next detection step, milliseconds); one that stays tripped is a VM the kernel
stops while the agent has not recorded why: worth an alert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smtpguard import logs
from smtpguard.datapath import trip


class TripCollector(Collector):
    def __init__(self, table: Callable[[], Any]) -> None:
        self._table = table

    def collect(self) -> Iterator[Metric]:
        try:
            armed, tripped = trip.census(self._table())
        except Exception:  # no datapath (yet): the family is left out
            logs.get().debug("metrics.trip_read_failed", exc_info=True)
            return
        g = GaugeMetricFamily("smtpguard_trip_wires", "VM interfaces whose trip wire is "
                              "armed (counting down) or tripped (SYNs marked for rejection "
                              "until the agent's block)", labels=["state"])
        g.add_metric(["armed"], armed)
        g.add_metric(["tripped"], tripped)
        yield g
