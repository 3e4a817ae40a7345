"""A Hypothesis state machine over staking pools on a real PostgreSQL database.

Random stakers stake and unstake (as the vault's confirmed events), claim, and watch staff
fund the budget and change the rate, while simulated time passes. After every step, to the
base unit:

- what the budget emitted equals what an independent model of the pool's rate says it should
  (capped by the funded budget, nothing for seconds with no stake);
- paid + accrued (every staker's floored reward to the second) + dust + remainder == emitted
  ≤ funded, the ledger agreeing with the pool row;
- the scaled identity payable * 10^36 == Σ (accrued * 10^36 + stake * (acc - snapshot)) + slack
  holds exactly, and the dust is bounded by the number of stakers;
- the ledger check finds the books whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import db
from ledger.check import check_ledger
from ledger.commands import ChainRef, Leg, NewEntry, Resolve
from ledger.custody import clearing_code, ensure_chart
from ledger.engine import post_batch
from ledger.staking import accumulator, service
from ledger.staking.accumulator import BPS, SCALE, YEAR_S
from tests.conftest import APP_ROLE, Databases

CHAIN_ID = 31337
VAULT = "0x" + "5a" * 20
STAKERS = tuple("0x" + f"{i:02x}" * 20 for i in range(1, 7))
START_S = 1_700_000_000
AMOUNTS = st.one_of(st.integers(1, 1_000), st.integers(1, 10**24))


class _Target:
    engine: sa.Engine | None = None
    txs = itertools.count(1)
    reached: set[str] = set()


class StakingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert _Target.engine is not None
        self.conn = _Target.engine.connect()
        self.tx = self.conn.begin()
        self.now = START_S
        self.stakes = dict.fromkeys(STAKERS, 0)
        self.funded = 0
        self.emitted = 0
        self.paid = 0
        self.claims = 0

    def teardown(self) -> None:
        report = check_ledger(self.conn)
        self.tx.rollback()
        assert report["ok"], report["breaks"]
        self.conn.close()

    @initialize(
        kind=st.sampled_from(accumulator.POOL_KINDS),
        apr_bps=st.integers(0, 50_000),
        rate=st.one_of(st.integers(0, 1_000), st.integers(0, 10**20)),
        budget=st.one_of(st.integers(1, 10**6), st.integers(1, 10**26)),
    )
    def create(self, kind: accumulator.PoolKind, apr_bps: int, rate: int, budget: int) -> None:
        ensure_chart(self.conn, CHAIN_ID, [VAULT])
        settings_ = service.PoolSettings(
            kind,
            apr_bps if kind == "fixed_apr" else None,
            rate if kind == "emission" else None,
            0,
            0,
            None,
            True,
        )
        name = f"pool-{next(_Target.txs)}"
        pool, _ = service.create_pool(
            self.conn, name, settings_, chain_id=CHAIN_ID, vault=VAULT, actor="machine", now_s=self.now
        )
        self.pool_id = pool.id
        self.kind, self.apr, self.rate = kind, apr_bps, rate
        self._fund(budget)

    # -- the model of what the budget emits --------------------------------------------------

    def _model_tick(self) -> None:
        total = sum(self.stakes.values())
        seconds = self.now - self.model_last
        self.model_last = self.now
        if total == 0 or seconds <= 0:
            return
        if self.kind == "emission":
            wanted = self.rate * seconds
        else:
            wanted = total * self.apr * seconds // (BPS * YEAR_S)
        self.emitted += min(wanted, self.funded - self.emitted)

    @property
    def model_last(self) -> int:
        return getattr(self, "_model_last", START_S)

    @model_last.setter
    def model_last(self, value: int) -> None:
        self._model_last = value

    def _fund(self, amount: int) -> None:
        self._model_tick()
        service.fund_pool(
            self.conn, self.pool_id, amount, key=f"fund:{next(_Target.txs)}", actor="machine", now_s=self.now
        )
        self.funded += amount

    # -- rules -------------------------------------------------------------------------------

    @rule(seconds=st.one_of(st.integers(1, 60), st.integers(1, 40 * 86_400)))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule()
    def tick(self) -> None:
        self._model_tick()
        service.tick_pool(self.conn, self.pool_id, self.now)

    @rule(amount=st.one_of(st.integers(1, 10**6), st.integers(1, 10**26)))
    def fund(self, amount: int) -> None:
        self._fund(amount)

    def _event(self, staker: str, amount: int, staked: bool) -> service.StakeEvent:
        n = next(_Target.txs)
        new = self.stakes[staker] + (amount if staked else -amount)
        chain = ChainRef(CHAIN_ID, "0x" + f"{n:064x}", 0, n, "0x" + f"{n + 1:064x}")
        return service.StakeEvent(chain, self.pool_id, staker, amount, new, self.now, staked)

    @rule(staker=st.sampled_from(STAKERS), amount=AMOUNTS, again=st.booleans())
    def stake(self, staker: str, amount: int, again: bool) -> None:
        self._model_tick()
        event = self._event(staker, amount, True)
        assert service.apply_stake_event(self.conn, VAULT, event, self.now) == "applied"
        self.stakes[staker] += amount
        if again:  # the same confirmed event delivered twice changes nothing
            assert service.apply_stake_event(self.conn, VAULT, event, self.now) == "exists"
            _Target.reached.add("duplicate")

    @precondition(lambda self: any(self.stakes.values()))
    @rule(data=st.data())
    def unstake(self, data: st.DataObject) -> None:
        staker = data.draw(st.sampled_from([s for s, v in self.stakes.items() if v > 0]))
        amount = data.draw(st.integers(1, self.stakes[staker]))
        self._model_tick()
        assert (
            service.apply_stake_event(self.conn, VAULT, self._event(staker, amount, False), self.now)
            == "applied"
        )
        self.stakes[staker] -= amount
        _Target.reached.add("unstake")

    @precondition(lambda self: any(self.stakes.values()))
    @rule(data=st.data(), part=st.sampled_from(["all", "half", "one"]), anyone=st.booleans())
    def claim(self, data: st.DataObject, part: str, anyone: bool) -> None:
        # Often a staker with a stake (who may have earned something), otherwise anyone.
        holders = [s for s, v in self.stakes.items() if v > 0]
        staker = data.draw(st.sampled_from(list(STAKERS) if anyone else holders))
        self._model_tick()
        read = [r for r in service.rewards_of(self.conn, staker, self.now) if r["pool_id"] == self.pool_id]
        position = service.settle_position(self.conn, self.pool_id, staker, self.now)
        # What the reader computed without writing is what settling books, to the base unit.
        assert [int(r["accrued"]) for r in read] == ([position.accrued] if read else [])
        if position.accrued == 0:
            return
        amount = {"all": None, "half": max(1, position.accrued // 2), "one": 1}[part]
        taken = service.reserve_claim(
            self.conn, self.pool_id, staker, amount, actor=staker, now_s=self.now, details={"part": part}
        )
        key = f"claim:{next(_Target.txs)}"
        hold = NewEntry(
            key,
            (
                Leg(
                    service.payable_account(self.pool_id),
                    clearing_code(CHAIN_ID),
                    taken,
                    "TRACE",
                    pending=True,
                ),
            ),
        )
        post = Resolve(f"settle:{key}", key, "post")
        for result in post_batch(self.conn, [hold, post]):
            assert result.status == "created", result
        self.paid += taken
        _Target.reached.add("claim")

    @rule(apr=st.integers(0, 50_000), rate=st.one_of(st.integers(0, 1_000), st.integers(0, 10**20)))
    def change_rate(self, apr: int, rate: int) -> None:
        self._model_tick()
        change = {"apr_bps": apr} if self.kind == "fixed_apr" else {"rate_per_s": rate}
        service.change_pool(self.conn, self.pool_id, change, actor="machine", now_s=self.now)
        self.apr, self.rate = apr, rate

    # -- invariants --------------------------------------------------------------------------

    def _balances(self) -> dict[str, tuple[int, int, int]]:
        codes = [
            service.budget_account(self.pool_id),
            service.payable_account(self.pool_id),
            service.remainder_account(self.pool_id),
        ]
        rows = self.conn.execute(
            sa.text(
                "SELECT code, debits_posted, credits_posted, debits_pending FROM ledger_accounts"
                " WHERE code = ANY(:c)"
            ),
            {"c": codes},
        )
        named = {r.code: (int(r.debits_posted), int(r.credits_posted), int(r.debits_pending)) for r in rows}
        return {"budget": named[codes[0]], "payable": named[codes[1]], "remainder": named[codes[2]]}

    @invariant()
    def books_add_up(self) -> None:
        if not hasattr(self, "pool_id"):
            return
        pool = service.get_pool(self.conn, self.pool_id)
        b = self._balances()
        assert pool.emitted == self.emitted, "the budget emitted what the rate and the budget allow"
        assert b["budget"][1] == self.funded and b["budget"][0] == self.emitted
        assert self.emitted <= self.funded
        payable = b["payable"][1] - b["payable"][0] - b["payable"][2]
        remainder = b["remainder"][1] - b["remainder"][0]
        assert self.paid + payable + remainder == self.emitted
        positions = self.conn.execute(
            sa.text("SELECT staker, stake, snapshot, accrued FROM staking_positions WHERE pool_id = :p"),
            {"p": self.pool_id},
        ).all()
        assert {r.staker: int(r.stake) for r in positions if r.stake} == {
            s: v for s, v in self.stakes.items() if v
        }
        assert pool.total_staked == sum(self.stakes.values())
        owed = sum(int(r.accrued) * SCALE + int(r.stake) * (pool.acc - int(r.snapshot)) for r in positions)
        assert payable * SCALE == owed + pool.slack, "the scaled identity"
        accrued = sum(
            accumulator.accrued_at(int(r.stake), int(r.snapshot), int(r.accrued), pool.acc) for r in positions
        )
        dust = payable - accrued
        assert self.paid + accrued + dust + remainder == self.emitted
        assert 0 <= dust <= 2 * len(positions) + 1, "flooring dust stays bounded"


@pytest.fixture
def machine_db(databases: Databases, template_db: str) -> Iterator[sa.Engine]:
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    _Target.engine = engine
    _Target.reached = set()
    try:
        yield engine
    finally:
        _Target.engine = None
        engine.dispose()
        databases.drop(name)


def test_staking_books_are_conserved_to_the_base_unit(machine_db: sa.Engine) -> None:
    run_state_machine_as_test(
        StakingMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    # Claims need a funded pool, a stake and time to have accrued something, which a random run
    # does not always line up; tests/api/test_staking.py and the concurrency test book claims on purpose.
    assert _Target.reached >= {"unstake", "duplicate"}, _Target.reached
