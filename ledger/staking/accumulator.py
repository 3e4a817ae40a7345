"""The reward accumulator of a staking pool (DESIGN §8), as pure integer arithmetic.

A pool keeps ``acc``, the reward earned so far by one staked base unit, scaled by ``SCALE``.
A tick (O(1) in the number of stakers) turns the seconds since the last tick into reward and
raises ``acc`` by that reward divided by the total staked; a staker's reward is then
``stake * (acc - snapshot) / SCALE``, also O(1), with ``snapshot`` the ``acc`` their position
was last settled at.

Every division floors, in the platform's favour, and nothing is lost:

- The tick books ``to_payable = ceil(total * Δacc / SCALE)`` base units to the payable account:
  at least what the stakers' shares of ``Δacc`` add up to, at most what the tick had to give.
  The scaled difference is kept in ``slack`` (scaled base units in the payable account that no
  staker owns).
- Settling a position floors its share to whole base units; the fraction goes to ``slack`` too.
- Once ``slack`` holds whole base units they move back to the remainder account, and the
  remainder account's balance is handed out again with the next tick's reward (carried forward).

So at all times, exactly: ``payable * SCALE == Σ (accrued * SCALE + stake * (acc - snapshot)) + slack``.

A ``fixed_apr`` pool emits ``total * apr_bps * seconds / (10,000 * YEAR_S)`` per tick; an
``emission`` pool emits ``rate * seconds`` shared pro rata. Either is capped by what is left in
the pool's budget; a tick that is cut short marks the pool exhausted. Seconds with nothing
staked emit nothing: the budget keeps that reward for later stakers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from ledger.errors import InvalidInput

SCALE: Final = 10**36
# The year of a fixed APR: 365 days of 86,400 s (leap days are not counted).
YEAR_S: Final = 365 * 86_400
BPS: Final = 10_000

PoolKind = Literal["fixed_apr", "emission"]
POOL_KINDS: Final[tuple[PoolKind, ...]] = ("fixed_apr", "emission")


@dataclass(frozen=True, slots=True)
class PoolState:
    """What a tick needs to know about a pool."""

    kind: PoolKind
    apr_bps: int
    rate_per_s: int
    acc: int
    slack: int
    total_staked: int
    last_tick_s: int


@dataclass(frozen=True, slots=True)
class Tick:
    """The outcome of one tick: the pool's new accumulator and what moves between its accounts.

    ``from_budget`` moves budget → remainder; ``to_payable`` remainder → payable; ``dust``
    payable → remainder (the whole base units of ``slack``)."""

    acc: int
    slack: int
    last_tick_s: int
    from_budget: int
    to_payable: int
    dust: int
    wanted: int
    exhausted: bool

    @property
    def moves_money(self) -> bool:
        return self.from_budget > 0 or self.to_payable > 0 or self.dust > 0


def reward_due(state: PoolState, seconds: int) -> int:
    """The reward ``seconds`` of the pool's current rate give (before the budget cap), floored."""
    if seconds <= 0 or state.total_staked == 0:
        return 0
    if state.kind == "emission":
        return state.rate_per_s * seconds
    return state.total_staked * state.apr_bps * seconds // (BPS * YEAR_S)


def tick(state: PoolState, now_s: int, budget_available: int, remainder_available: int) -> Tick:
    """Advance the pool to ``now_s`` (a time before the last tick leaves it where it is).

    ``budget_available`` and ``remainder_available`` are the spendable balances of the pool's
    budget and remainder accounts."""
    if budget_available < 0 or remainder_available < 0:
        raise InvalidInput("available balances cannot be negative")
    if now_s <= state.last_tick_s:
        return Tick(state.acc, state.slack, state.last_tick_s, 0, 0, 0, 0, False)
    wanted = reward_due(state, now_s - state.last_tick_s)
    if state.total_staked == 0:
        return Tick(state.acc, state.slack, now_s, 0, 0, 0, 0, False)
    from_budget = min(wanted, budget_available)
    exhausted = wanted > from_budget
    to_share = from_budget + remainder_available
    acc_delta = to_share * SCALE // state.total_staked
    shared_scaled = state.total_staked * acc_delta
    to_payable = -(-shared_scaled // SCALE)
    slack = state.slack + to_payable * SCALE - shared_scaled
    dust = slack // SCALE
    slack -= dust * SCALE
    if not 0 <= to_payable <= to_share or not 0 <= slack < SCALE:
        raise ArithmeticError("accumulator tick out of bounds")
    return Tick(state.acc + acc_delta, slack, now_s, from_budget, to_payable, dust, wanted, exhausted)


@dataclass(frozen=True, slots=True)
class Settled:
    """A position brought up to the pool's accumulator: its whole accrued base units and the
    scaled fraction that goes to the pool's slack."""

    accrued: int
    snapshot: int
    fraction: int


def settle(stake: int, snapshot: int, accrued: int, acc: int) -> Settled:
    """Settle a position of ``stake`` last settled at ``snapshot`` against ``acc``."""
    if acc < snapshot:
        raise ArithmeticError("a position's snapshot is ahead of its pool's accumulator")
    owed_scaled = stake * (acc - snapshot)
    whole, fraction = divmod(owed_scaled, SCALE)
    return Settled(accrued + whole, acc, fraction)


def accrued_at(stake: int, snapshot: int, accrued: int, acc: int) -> int:
    """What a position has accrued at accumulator ``acc`` (read only; floors)."""
    return settle(stake, snapshot, accrued, acc).accrued
