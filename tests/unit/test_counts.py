"""Retiring idle rejection counters: the commands and the sums (pure)."""

from __future__ import annotations

from smtpguard.enforce.counts import BlockedCount, merged, packets, retire_script


def test_retiring_moves_hot_values_onto_what_was_retired_before() -> None:
    hot = [BlockedCount("bridge", "port25", "vnet1", 25, 4),
           BlockedCount("inet", "block", "vnet2", 587, 3),
           BlockedCount("bridge", "port25", "vnet9", 25, 8)]  # not asked for
    cold = {("inet", "block", "vnet2", 587): 10}
    script, after = retire_script(hot, cold, ["vnet1", "vnet2"])
    assert script == [
        'delete element bridge smtpguard cnt_port25 { "vnet1" . 25 }',
        'add element bridge smtpguard old_port25 { "vnet1" . 25 counter packets 4 bytes 0 }',
        'delete element inet smtpguard cnt_block { "vnet2" . 587 }',
        'delete element inet smtpguard old_block { "vnet2" . 587 }',
        'add element inet smtpguard old_block { "vnet2" . 587 counter packets 13 bytes 0 }',
    ]
    assert after == {("bridge", "port25", "vnet1", 25): 4, ("inet", "block", "vnet2", 587): 13}
    # Readers see the same counts before and after (hot + retired).
    assert merged(hot, cold) == merged([hot[2]], after)


def test_a_name_that_would_need_escaping_stays_hot() -> None:
    script, after = retire_script([BlockedCount("inet", "port25", 'a"b', 25, 1)], {}, ['a"b'])
    assert script == [] and after == {}


def test_overflow_sums_its_per_port_elements() -> None:
    listed = {"elem": [{"elem": {"val": 25, "counter": {"packets": 3, "bytes": 180}}},
                       {"elem": {"val": 587, "counter": {"packets": 2, "bytes": 120}}}]}
    assert packets(listed) == 5 and packets({}) == 0
