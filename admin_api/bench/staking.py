"""`tracechain bench staking`: what a pool tick and a staker's reward query cost, with 1,000 and
with 100,000 stakers.

In a scratch database (dropped at the end) two emission pools are created and funded, and their
positions are written set-based (one INSERT … SELECT each; the positions are what confirmed
``Staked`` events would have left). Each tick then advances its pool by one second in a
transaction of its own, as the beat task does; each query reads one random staker's rewards to
the second in a transaction of its own, as ``GET /stakers/{address}/rewards`` does. The bench
checks the books afterwards (emitted = payable + remainder for each pool, the ledger check) and
exits 1 if they do not hold.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import click
import sqlalchemy as sa

from admin_api.bench.ledger import (
    BenchError,
    scratch_database,
    shielded_from_interrupts,
    terminate_as_interrupt,
)
from ledger import db
from ledger.check import check_ledger
from ledger.custody import ensure_chart
from ledger.settings import Settings, load_settings
from ledger.staking import service

TRACE = 10**18
CHAIN_ID = 31337
VAULT = "0x" + "5a" * 20
START_S = 1_800_000_000
TICK_RATIO_TARGET = 1.5
QUERY_P99_TARGET_MS = 5.0
# Stakers of the two pools are numbered apart, so each holds one position.
SMALL_FIRST = 1
LARGE_FIRST = 10**9


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    ticks: int
    queries: int


FULL = Sizes(small=1_000, large=100_000, ticks=300, queries=3_000)
QUICK = Sizes(small=1_000, large=100_000, ticks=60, queries=600)


def staker_address(index: int) -> str:
    return "0x" + f"{index:040x}"


def _populate(engine: sa.Engine, name: str, stakers: int, first: int) -> int:
    """A funded emission pool with ``stakers`` positions of 1 to 1,000 TRACE, the stakers
    numbered from ``first``; its id."""
    with engine.begin() as conn:
        settings = service.PoolSettings("emission", None, TRACE, 0, 0, None, True)
        pool, _ = service.create_pool(
            conn, name, settings, chain_id=CHAIN_ID, vault=VAULT, actor="bench", now_s=START_S
        )
        service.fund_pool(
            conn, pool.id, 10**12 * TRACE, key=f"bench-fund-{name}", actor="bench", now_s=START_S
        )
        conn.execute(
            sa.text(
                "INSERT INTO staking_positions (pool_id, staker, stake, snapshot, accrued, unlock_at_s)"
                " SELECT :p, '0x' || lpad(to_hex(i), 40, '0'), (1 + i % 1000) * CAST(:trace AS numeric),"
                " 0, 0, 0 FROM generate_series(:first, :first + :n - 1) AS i"
            ),
            {"p": pool.id, "n": stakers, "first": first, "trace": TRACE},
        )
        conn.execute(
            sa.text(
                "UPDATE staking_pools SET total_staked = (SELECT sum(stake) FROM staking_positions"
                " WHERE pool_id = :p) WHERE id = :p"
            ),
            {"p": pool.id},
        )
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE staking_positions"))
        conn.commit()
    return pool.id


def _time_ticks(engine: sa.Engine, pool_id: int, ticks: int) -> list[float]:
    times = []
    for step in range(1, ticks + 1):
        started = time.perf_counter()
        with engine.begin() as conn:
            service.tick_pool(conn, pool_id, START_S + step)
        times.append((time.perf_counter() - started) * 1000)
    return times


def _time_queries(
    engine: sa.Engine, first: int, stakers: int, queries: int, now_s: int, seed: int
) -> list[float]:
    rng = random.Random(seed)  # noqa: S311 - which staker to ask for, not a secret
    times = []
    with engine.connect() as conn:
        for _ in range(queries):
            address = staker_address(rng.randint(first, first + stakers - 1))
            started = time.perf_counter()
            with conn.begin():
                [reward] = service.rewards_of(conn, address, now_s)
            times.append((time.perf_counter() - started) * 1000)
            if int(reward["accrued"]) <= 0:
                raise BenchError(f"staker {address} has accrued nothing")
    return times


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _checks(engine: sa.Engine, pool_ids: list[int]) -> dict[str, bool]:
    with engine.connect() as conn:
        conserved = True
        for pool_id in pool_ids:
            pool = service.get_pool(conn, pool_id)
            [line] = [p for p in service.liability_report(conn, pool.last_tick_s) if p["pool_id"] == pool_id]
            emitted = int(line["emitted"])
            conserved &= emitted == int(line["accrued_unpaid"]) + int(line["remainder"]) + int(line["paid"])
            conserved &= int(line["stakers_accrued"]) <= int(line["accrued_unpaid"])
            conserved &= emitted == (pool.last_tick_s - START_S) * TRACE
        report = check_ledger(conn)
    return {"conserved": conserved, "books_balanced": bool(report["ok"])}


def run_staking_bench(settings: Settings, sizes: Sizes, seed: int = 7) -> dict[str, Any]:
    server_url = settings.database_url
    embedded = None
    if server_url is None:
        from admin_api.embedded import start_postgres

        embedded = start_postgres(settings.data_dir)
        server_url = embedded.url
    try:
        with terminate_as_interrupt(), scratch_database(server_url) as url:
            db.upgrade(url, role=settings.db_role)
            engine = db.make_engine(url, role=settings.db_role, pool_size=2)
            try:
                with engine.begin() as conn:
                    ensure_chart(conn, CHAIN_ID, [VAULT])
                setup = time.perf_counter()
                small = _populate(engine, "bench-small", sizes.small, SMALL_FIRST)
                large = _populate(engine, "bench-large", sizes.large, LARGE_FIRST)
                setup_s = time.perf_counter() - setup
                ticks_small = _time_ticks(engine, small, sizes.ticks)
                ticks_large = _time_ticks(engine, large, sizes.ticks)
                queries = _time_queries(
                    engine, LARGE_FIRST, sizes.large, sizes.queries, START_S + sizes.ticks + 30, seed
                )
                checks = _checks(engine, [small, large])
            finally:
                engine.dispose()
    finally:
        if embedded is not None:
            with shielded_from_interrupts():
                embedded.stop()
    tick_small = statistics.median(ticks_small)
    tick_large = statistics.median(ticks_large)
    return {
        "tick_ms_1k": round(tick_small, 3),
        "tick_ms_100k": round(tick_large, 3),
        "tick_ratio": round(tick_large / tick_small, 3),
        "query_p50_ms": round(_percentile(queries, 0.5), 3),
        "query_p99_ms": round(_percentile(queries, 0.99), 3),
        "stakers": {"small": sizes.small, "large": sizes.large},
        "ticks": sizes.ticks,
        "queries": sizes.queries,
        "setup_s": round(setup_s, 2),
        "targets": {"tick_ratio": TICK_RATIO_TARGET, "query_p99_ms": QUERY_P99_TARGET_MS},
        "checks": checks,
    }


@click.command("staking")
@click.option("--quick", is_flag=True, help=f"{QUICK.ticks} ticks per pool and {QUICK.queries} queries.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--small", type=click.IntRange(1, 10_000_000), help="Stakers of the small pool (default 1,000)."
)
@click.option(
    "--large", type=click.IntRange(1, 10_000_000), help="Stakers of the large pool (default 100,000)."
)
@click.option("--ticks", type=click.IntRange(1, 100_000), help="Ticks timed per pool.")
@click.option("--queries", type=click.IntRange(1, 1_000_000), help="Reward queries timed.")
def staking_bench(
    quick: bool, as_json: bool, small: int | None, large: int | None, ticks: int | None, queries: int | None
) -> None:
    """Cost of a pool tick with 1,000 and with 100,000 stakers, and of a staker's reward query.

    Prints tick_ms_1k, tick_ms_100k (median per tick), tick_ratio, query_p99_ms. Targets:
    tick_ratio <= 1.5, query_p99_ms <= 5. Exits 1 if the books do not check out afterwards.
    """
    plan = QUICK if quick else FULL
    sizes = Sizes(small or plan.small, large or plan.large, ticks or plan.ticks, queries or plan.queries)
    try:
        report = run_staking_bench(load_settings(), sizes)
    except KeyboardInterrupt:
        click.echo("interrupted; the scratch database was dropped", err=True)
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
    else:
        click.echo(f"stakers                 {sizes.small:>10,} {sizes.large:>10,}")
        click.echo(f"tick (median ms)        {report['tick_ms_1k']:>10} {report['tick_ms_100k']:>10}")
        click.echo(f"tick_ratio              {report['tick_ratio']:>10}  (target <= {TICK_RATIO_TARGET})")
        click.echo(
            f"query p50 / p99 (ms)    {report['query_p50_ms']:>10} {report['query_p99_ms']:>10}"
            f"  (target p99 <= {QUERY_P99_TARGET_MS})"
        )
        click.echo(f"checks                  {report['checks']}")
    if not all(report["checks"].values()):
        raise BenchError(f"the books do not check out: {report['checks']}")
