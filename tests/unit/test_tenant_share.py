"""When a host's count for a tenant's budget goes out (fleet/tenants.py): on
its first traffic, when it moved by a share of the headroom, once a refresh
while unchanged, once as 0; and what makes that safe: once the fleet's real
total reaches the budget, some host's sum does within one more share
period."""

from __future__ import annotations

import random

from smtpguard.fleet.tenants import REFRESH, due, step


def test_the_step_is_half_the_headroom_split_over_the_hosts() -> None:
    assert step(1000, 200, 4) == 100  # (1000 - 200) / (2 * 4)
    assert step(1000, 990, 4) == 1
    assert step(1000, 1200, 4) == 1  # past the budget: every change
    assert step(1000, 0, 0) == 500  # no host known yet: this one


def test_first_traffic_goes_out_and_no_traffic_costs_nothing() -> None:
    assert due(1, None, 1, 1, 1000, 0.0, 60.0)
    assert not due(0, None, 0, 1, 1000, 0.0, 60.0)
    assert not due(0, 0, 0, 1, 1000, 3600.0, 60.0)  # quiet, and said so once


def test_far_below_the_budget_a_small_move_waits_for_the_refresh() -> None:
    # 20 hosts, 14,400 of 50,000: the step is 890.
    assert not due(721, 720, 14_400, 20, 50_000, 5.0, 60.0)
    assert due(721, 720, 14_400, 20, 50_000, 60.0, 60.0)
    assert not due(720, 720, 14_400, 20, 50_000, 59.0, 60.0)
    assert due(720, 720, 14_400, 20, 50_000, 60.0, 60.0)  # unchanged: fresh again
    assert due(1620, 720, 14_400, 20, 50_000, 5.0, 60.0)  # a burst goes out at once


def test_near_the_budget_every_change_goes_out() -> None:
    assert due(31, 30, 59, 3, 60, 1.0, 12.0)
    assert due(29, 30, 59, 3, 60, 1.0, 12.0)


def test_the_end_of_traffic_goes_out_once() -> None:
    assert due(0, 5, 5, 1, 1000, 1.0, 60.0)
    assert not due(0, 0, 0, 1, 1000, 1.0, 60.0)


def test_the_refresh_is_a_minute_at_the_default_share_every() -> None:
    assert REFRESH * 5.0 == 60.0


def period(mine: list[int], sent: list[int | None], at: list[float], budget: int,
           t: float) -> list[int]:
    """Each host looks at its count (in turn, as the hosts' ticks fall) and
    publishes it by `due`; returns the sums they saw."""
    sums = []
    for i in range(len(mine)):
        others = [s for j, s in enumerate(sent) if j != i and s is not None]
        total = mine[i] + sum(others)
        sums.append(total)
        if due(mine[i], sent[i], total, len(others) + 1, budget, t - at[i], 60.0):
            sent[i], at[i] = mine[i], t
    return sums


def test_the_budget_is_seen_within_one_more_share_period() -> None:
    """Hosts add random traffic each share period and publish by `due`; once
    the real total reaches the budget, some host's sum (its own count and the
    others' published ones) reaches it at the latest one share period later
    (the steps were computed on the sums of the period before)."""
    rng = random.Random(7)
    late = 0
    for _ in range(300):
        n, budget = rng.randint(1, 25), rng.randint(10, 5000)
        mine = [0] * n
        sent: list[int | None] = [None] * n
        at = [0.0] * n
        t = 0.0
        sums = [0]
        while sum(mine) < budget:
            t += 5.0
            for i in range(n):
                mine[i] += rng.choice([0, 0, 1, 2, rng.randint(0, budget // 10 + 1)])
            sums = period(mine, sent, at, budget, t)
        if max(sums) < budget:
            late += 1
            assert max(period(mine, sent, at, budget, t + 5.0)) >= budget, (n, budget, mine)
    assert late  # the case the next period is there for did occur
