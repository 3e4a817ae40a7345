"""Stakes, unstakes, claims, ticks, fundings and rate changes of one pool from several threads at
once, each in a transaction of its own, on real PostgreSQL: afterwards the books hold exactly
(every staker's stake as its thread made it, the scaled identity of the accumulator, paid +
payable + remainder == emitted <= funded, the ledger check), whatever interleaving happened."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa

from ledger import db
from ledger.check import check_ledger
from ledger.commands import ChainRef, Leg, NewEntry, Resolve
from ledger.custody import clearing_code, ensure_chart
from ledger.engine import post_batch
from ledger.errors import LedgerError
from ledger.staking import service
from ledger.staking.accumulator import SCALE
from tests.conftest import APP_ROLE

CHAIN_ID = 31337
VAULT = "0x" + "5a" * 20
THREADS = 4
STEPS = 40
START_S = 1_800_000_000
RETRYABLE = {"40P01", "40001"}  # deadlock detected, serialization failure


def _retrying(engine: sa.Engine, work: Callable[[sa.Connection], Any]) -> Any:
    for attempt in range(10):
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.DBAPIError as exc:
            orig = exc.orig
            if not isinstance(orig, psycopg.Error) or orig.sqlstate not in RETRYABLE or attempt == 9:
                raise
    raise AssertionError("unreachable")


def test_concurrent_staking_keeps_the_books_exact(fresh_db_url: str) -> None:
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=THREADS + 2)
    clock = itertools.count(START_S)
    clock_lock = threading.Lock()
    txs = itertools.count(1)
    paid = [0] * THREADS
    funded = [10**9]
    stakes: list[dict[str, int]] = [{} for _ in range(THREADS)]
    errors: list[BaseException] = []

    def now() -> int:
        with clock_lock:
            return next(clock)

    with engine.begin() as conn:
        ensure_chart(conn, CHAIN_ID, [VAULT])
        settings = service.PoolSettings("emission", None, 1_000, 0, 0, None, True)
        pool, _ = service.create_pool(
            conn, "concurrent", settings, chain_id=CHAIN_ID, vault=VAULT, actor="t", now_s=START_S
        )
        service.fund_pool(conn, pool.id, funded[0], key="fund-0", actor="t", now_s=START_S)

    def stake_event(staker: str, amount: int, new: int, staked: bool) -> service.StakeEvent:
        n = next(txs)
        chain = ChainRef(CHAIN_ID, "0x" + f"{n:064x}", 0, n, "0x" + f"{n:064x}")
        return service.StakeEvent(chain, pool.id, staker, amount, new, 0, staked)

    def worker(index: int) -> None:
        rng = random.Random(index)
        own = ["0x" + f"{index:02x}{k:02x}" * 10 for k in range(2)]
        mine = stakes[index]
        try:
            for step in range(STEPS):
                staker = rng.choice(own)
                action = rng.choice(["stake", "stake", "unstake", "claim", "claim", "tick", "fund", "rate"])
                if action == "stake":
                    amount = rng.randint(1, 10**6)
                    event = stake_event(staker, amount, mine.get(staker, 0) + amount, True)
                    _retrying(engine, lambda c, e=event: service.apply_stake_event(c, VAULT, e, now()))
                    mine[staker] = mine.get(staker, 0) + amount
                elif action == "unstake" and mine.get(staker, 0) > 0:
                    amount = rng.randint(1, mine[staker])
                    event = stake_event(staker, amount, mine[staker] - amount, False)
                    _retrying(engine, lambda c, e=event: service.apply_stake_event(c, VAULT, e, now()))
                    mine[staker] -= amount
                elif action == "claim":
                    key = f"claim-{index}-{step}"

                    def claim(conn: sa.Connection, staker: str = staker, key: str = key) -> int:
                        try:
                            taken = service.reserve_claim(
                                conn, pool.id, staker, None, actor=staker, now_s=now(), details={}
                            )
                        except LedgerError as exc:
                            assert exc.code == "nothing_to_claim"
                            return 0
                        leg = Leg(
                            service.payable_account(pool.id),
                            clearing_code(CHAIN_ID),
                            taken,
                            "TRACE",
                            pending=True,
                        )
                        results = post_batch(
                            conn, [NewEntry(key, (leg,)), Resolve(f"post-{key}", key, "post")]
                        )
                        assert all(r.status == "created" for r in results), results
                        return taken

                    paid[index] += _retrying(engine, claim)
                elif action == "tick":
                    _retrying(engine, lambda c: service.tick_pool(c, pool.id, now()))
                elif action == "fund":
                    amount = rng.randint(1, 10**6)
                    key = f"fund-{index}-{step}"
                    _retrying(
                        engine,
                        lambda c, a=amount, k=key: service.fund_pool(
                            c, pool.id, a, key=k, actor="t", now_s=now()
                        ),
                    )
                    with clock_lock:
                        funded[0] += amount
                elif action == "rate":
                    rate = rng.randint(0, 5_000)
                    _retrying(
                        engine,
                        lambda c, r=rate: service.change_pool(
                            c, pool.id, {"rate_per_s": r}, actor="t", now_s=now()
                        ),
                    )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    try:
        with engine.connect() as conn:
            pool = service.get_pool(conn, pool.id)
            balances = {
                r.code: (int(r.debits_posted), int(r.credits_posted), int(r.debits_pending))
                for r in conn.execute(
                    sa.text(
                        "SELECT code, debits_posted, credits_posted, debits_pending FROM ledger_accounts"
                        " WHERE code LIKE :p"
                    ),
                    {"p": f"rewards:{pool.id}:%"},
                )
            }
            positions = conn.execute(
                sa.text("SELECT staker, stake, snapshot, accrued FROM staking_positions WHERE pool_id = :p"),
                {"p": pool.id},
            ).all()
            report = check_ledger(conn)
    finally:
        engine.dispose()
    expected = {s: v for own in stakes for s, v in own.items() if v}
    assert {r.staker: int(r.stake) for r in positions if r.stake} == expected
    assert pool.total_staked == sum(expected.values())
    budget = balances[service.budget_account(pool.id)]
    payable = balances[service.payable_account(pool.id)]
    remainder = balances[service.remainder_account(pool.id)]
    assert budget[1] == funded[0] and budget[0] == pool.emitted <= funded[0]
    payable_available = payable[1] - payable[0] - payable[2]
    assert sum(paid) + payable_available + (remainder[1] - remainder[0]) == pool.emitted
    owed = sum(int(r.accrued) * SCALE + int(r.stake) * (pool.acc - int(r.snapshot)) for r in positions)
    assert payable_available * SCALE == owed + pool.slack
    assert pool.emitted > 0 and sum(paid) > 0
    assert report["ok"], report["breaks"]
