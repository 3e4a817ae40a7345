"""The staking accumulator as pure arithmetic: rates, budget caps, dust, settlement."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import InvalidInput
from ledger.staking import accumulator as acc
from ledger.staking.accumulator import SCALE, YEAR_S, PoolState

TRACE = 10**18


def emission(rate: int, total: int, last: int = 0, a: int = 0, slack: int = 0) -> PoolState:
    return PoolState("emission", 0, rate, a, slack, total, last)


def test_emission_shares_rate_times_seconds_pro_rata() -> None:
    t = acc.tick(emission(TRACE, 4 * TRACE), 10, budget_available=100 * TRACE, remainder_available=0)
    assert t.from_budget == 10 * TRACE and t.to_payable == 10 * TRACE and t.dust == 0
    assert not t.exhausted and t.last_tick_s == 10
    # One staker of 1 TRACE out of 4 gets a quarter.
    assert acc.accrued_at(TRACE, 0, 0, t.acc) == 10 * TRACE // 4


def test_fixed_apr_is_per_year_of_365_days() -> None:
    state = PoolState("fixed_apr", 1_000, 0, 0, 0, 1_000 * TRACE, 0)
    t = acc.tick(state, YEAR_S, budget_available=10**30, remainder_available=0)
    assert t.from_budget == 100 * TRACE
    assert acc.accrued_at(1_000 * TRACE, 0, 0, t.acc) == 100 * TRACE


def test_no_stake_emits_nothing_and_keeps_the_budget() -> None:
    t = acc.tick(emission(TRACE, 0, last=5), 100, budget_available=50 * TRACE, remainder_available=0)
    assert (t.from_budget, t.to_payable, t.wanted, t.exhausted) == (0, 0, 0, False)
    assert t.last_tick_s == 100 and t.acc == 0


def test_budget_caps_the_tick_and_marks_it_exhausted() -> None:
    t = acc.tick(emission(TRACE, TRACE), 10, budget_available=3 * TRACE, remainder_available=0)
    assert t.from_budget == 3 * TRACE and t.wanted == 10 * TRACE and t.exhausted
    empty = acc.tick(emission(TRACE, TRACE, last=10, a=t.acc), 20, budget_available=0, remainder_available=0)
    assert empty.from_budget == 0 and empty.to_payable == 0 and empty.exhausted and empty.acc == t.acc


def test_a_time_before_the_last_tick_changes_nothing() -> None:
    t = acc.tick(emission(TRACE, TRACE, last=50, a=7), 40, budget_available=TRACE, remainder_available=0)
    assert (t.acc, t.last_tick_s, t.from_budget) == (7, 50, 0)


def test_dust_is_kept_and_returned_to_the_remainder() -> None:
    # 10 units over 3 staked units: each unit's share is 3.33…; payable takes the ceiling of
    # what the accumulator hands out, the scaled excess is slack.
    t = acc.tick(emission(1, 3), 10, budget_available=10, remainder_available=0)
    assert t.to_payable == 10
    assert t.slack + 3 * t.acc == t.to_payable * SCALE + t.dust * SCALE
    assert 0 <= t.slack < SCALE


def test_the_remainder_is_handed_out_with_the_next_tick() -> None:
    t = acc.tick(emission(1, 7), 1, budget_available=100, remainder_available=5)
    assert t.from_budget == 1 and t.to_payable <= 6
    assert t.acc == 6 * SCALE // 7


def test_negative_balances_are_refused() -> None:
    with pytest.raises(InvalidInput):
        acc.tick(emission(1, 1), 1, budget_available=-1, remainder_available=0)


def test_settle_refuses_a_snapshot_ahead_of_the_pool() -> None:
    with pytest.raises(ArithmeticError):
        acc.settle(1, 10, 0, 9)


@settings(max_examples=300, deadline=None)
@given(
    stakes=st.lists(st.integers(1, 10**27), min_size=1, max_size=8),
    rate=st.integers(0, 10**24),
    seconds=st.lists(st.integers(1, 10**6), min_size=1, max_size=6),
    budget=st.integers(0, 10**30),
)
def test_the_exact_scaled_identity_holds_after_ticks_and_settlements(
    stakes: list[int], rate: int, seconds: list[int], budget: int
) -> None:
    """payable * SCALE == Σ (accrued * SCALE + stake * (acc - snapshot)) + slack, exactly, and no
    staker's floored share exceeds its exact rational share of what was handed out."""
    total = sum(stakes)
    state = emission(rate, total)
    payable = remainder = 0
    emitted = 0
    exact = [Fraction(0)] * len(stakes)
    accrued = [0] * len(stakes)
    snaps = [0] * len(stakes)
    slack = 0
    now = 0
    for step, dt in enumerate(seconds):
        now += dt
        t = acc.tick(state, now, budget - emitted, remainder)
        emitted += t.from_budget
        remainder += t.from_budget - t.to_payable + t.dust
        payable += t.to_payable - t.dust
        for i, stake in enumerate(stakes):
            exact[i] += Fraction(stake * (t.acc - state.acc), SCALE)
        slack = t.slack
        state = PoolState("emission", 0, rate, t.acc, slack, total, t.last_tick_s)
        if step % 2 == 0:  # settle everyone every other tick
            for i, stake in enumerate(stakes):
                s = acc.settle(stake, snaps[i], accrued[i], state.acc)
                accrued[i], snaps[i] = s.accrued, s.snapshot
                slack += s.fraction
            state = PoolState("emission", 0, rate, state.acc, slack, total, state.last_tick_s)
        owed = sum(accrued[i] * SCALE + stakes[i] * (state.acc - snaps[i]) for i in range(len(stakes)))
        assert payable * SCALE == owed + slack
        assert emitted == payable + remainder
        assert emitted <= budget
        for i, stake in enumerate(stakes):
            assert acc.accrued_at(stake, snaps[i], accrued[i], state.acc) <= exact[i]
