"""`tracechain bench points`: supply-chain events accrued per second through the Celery workers.

A scratch database on ``TRACE_DATABASE_URL``'s server (or the embedded PostgreSQL), the broker
of ``tracechain bench escrow`` (``TRACE_REDIS_URL`` when no worker consumes it, else a private
embedded Redis), and ``tracechain worker`` processes as the Procfile runs them.

Set-up is not timed: the rules (three event types: plain, tier multipliers, a daily cap) and the
participants. The clock starts when the first batch is sent as a ``tracechain.points.ingest``
task and stops when every event is accrued in PostgreSQL. This process builds each batch (10,000
events of random participants and types) just before sending it, so the workers share the CPU
with it as with any producer. Afterwards the books are checked and the command exits 1 if any
check fails: every event accrued once; what the participants hold equals what the events scored
and what ``points:issued`` gave; no daily total above its cap; the lots hold what the accounts
do; the ledger check passes.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from admin_api.bench.chain import _emit, _migrated_engine, _run, database_server
from admin_api.bench.escrow import _check_alive, _Worker, broker
from admin_api.bench.ledger import (
    BenchError,
    BenchProgress,
    scratch_database,
    shielded_from_interrupts,
    terminate_as_interrupt,
)
from ledger.check import check_ledger
from ledger.points import ingest, rules
from ledger.settings import Settings, load_settings
from workers.app import QUEUE_LEDGER, TASK_POINTS_INGEST, make_celery

TARGET_EVENTS_PER_S = 8_000
SOURCE = "bench"
TIERS = ("bronze", "silver", "gold")
POLL_S = 0.25
READY_TIMEOUT_S = 60.0
WORKER_PREFIX = "points-bench-"
RUN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class PointsPlan:
    events: int
    batch: int = ingest.BATCH_MAX_EVENTS
    participants: int = 1_000
    workers: int = 2  # `tracechain worker` processes
    threads: int = 1  # threads of each


FULL = PointsPlan(events=1_000_000)
QUICK = PointsPlan(events=100_000)


@dataclass
class PointsReport:
    events_per_s: float
    target_events_per_s: int
    events: int
    accrued: int
    points: str
    seconds: float
    batches: int
    batch_size: int
    participants: int
    workers: int
    threads_per_worker: int
    checks: dict[str, bool]
    redis: str
    setup_s: float
    scratch_database: str

    @property
    def checks_ok(self) -> bool:
        return all(self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _setup(engine: sa.Engine, plan: PointsPlan, tag: str) -> datetime:
    """Rules and participants (set-based: set-up is not measured); when the rules took effect."""
    with engine.begin() as conn:
        rules.ensure_chart(conn)
        rules.add_rule_version(conn, rules.NewRule(f"{tag}.checkpoint", 10), "bench")
        rules.add_rule_version(
            conn, rules.NewRule(f"{tag}.on_time", 25, {"silver": 12_500, "gold": 15_000}), "bench"
        )
        rules.add_rule_version(conn, rules.NewRule(f"{tag}.handover", 40, daily_cap=200), "bench")
        asset = conn.execute(
            sa.text("SELECT id FROM ledger_assets WHERE code = :c"), {"c": rules.ASSET}
        ).scalar()
        conn.execute(
            sa.text(
                "INSERT INTO ledger_accounts (code, asset_id, kind, debits_must_not_exceed_credits)"
                " SELECT 'points:p' || g, :a, 'liability', true FROM generate_series(0, :n - 1) g"
            ),
            {"a": asset, "n": plan.participants},
        )
        conn.execute(
            sa.text(
                "INSERT INTO points_participants (id, tier, created_by)"
                " SELECT 'p' || g, (CAST(:tiers AS text[]))[1 + g % 3], 'bench'"
                " FROM generate_series(0, :n - 1) g"
            ),
            {"tiers": list(TIERS), "n": plan.participants},
        )
        since: datetime = conn.execute(sa.text("SELECT max(effective_at) FROM points_rules")).scalar_one()
    return since


def _batch(
    rng: random.Random, plan: PointsPlan, tag: str, since: datetime, first: int, size: int
) -> list[Any]:
    now = datetime.now(since.tzinfo)
    span_us = max(1, int((now - since).total_seconds() * 1_000_000) - 1)
    kinds = (f"{tag}.checkpoint", f"{tag}.on_time", f"{tag}.handover")
    return [
        {
            "source": SOURCE,
            "event_id": f"e{n}",
            "participant": f"p{rng.randrange(plan.participants)}",
            "type": kinds[n % 3],
            "occurred_at": (since + timedelta(microseconds=1 + rng.randrange(span_us))).isoformat(),
        }
        for n in range(first, first + size)
    ]


@contextlib.contextmanager
def _workers(env: dict[str, str], scratch_dir: Path, plan: PointsPlan) -> Any:
    workers: list[_Worker] = []
    try:
        for index in range(plan.workers):
            log = scratch_dir / f"worker-{index}.log"
            with log.open("wb") as out:
                # The Celery worker of `tracechain worker`, one process each, named apart.
                argv = ["-m", "celery", "-A", "workers.app", "worker", "-Q", QUEUE_LEDGER, "-P", "threads"]
                argv += ["-c", str(plan.threads), "-n", f"{WORKER_PREFIX}{index}@%h", "-l", "WARNING"]
                process = subprocess.Popen(
                    [sys.executable, *argv],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            workers.append(_Worker(f"worker-{index}", process, log))
        yield workers
    finally:
        with shielded_from_interrupts():
            for worker in workers:
                worker.stop()


def _accrued(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM points_events")).scalar_one())


def _checks(engine: sa.Engine, plan: PointsPlan) -> dict[str, bool]:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            events, distinct, scored = conn.execute(
                sa.text(
                    "SELECT count(*), count(DISTINCT (source, event_id)), COALESCE(sum(points), 0)"
                    " FROM points_events"
                )
            ).one()
            held, issued = conn.execute(
                sa.text(
                    "SELECT COALESCE(sum(credits_posted - debits_posted) FILTER (WHERE code <> :i), 0),"
                    " COALESCE(sum(debits_posted - credits_posted) FILTER (WHERE code = :i), 0)"
                    " FROM ledger_accounts WHERE code LIKE 'points:%'"
                ),
                {"i": rules.ISSUED},
            ).one()
            over_cap = conn.execute(
                sa.text(
                    "SELECT count(*) FROM points_daily_totals d"
                    " JOIN LATERAL (SELECT daily_cap FROM points_rules r WHERE r.event_type = d.event_type"
                    " ORDER BY version DESC LIMIT 1) r ON true"
                    " WHERE d.points > r.daily_cap"
                )
            ).scalar_one()
            lots = conn.execute(
                sa.text("SELECT COALESCE(sum(amount - expired), 0) FROM points_lots")
            ).scalar_one()
            ledger = check_ledger(conn)
    return {
        "every_event_once": events == plan.events and distinct == plan.events,
        "accounts_match_events": int(held) == int(scored) == int(issued),
        "caps_held": over_cap == 0,
        "lots_match_accounts": int(lots) == int(held),
        "books_balanced": bool(ledger["ok"]),
    }


def run_points_bench(settings: Settings, plan: PointsPlan, console: Console) -> PointsReport:
    started = time.time()
    tag = "bench"
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        progress = stack.enter_context(BenchProgress(console))
        scratch_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="tracechain-bench-points-"))
        )
        redis_url = progress.step(
            "Checking that no worker uses TRACE_REDIS_URL"
            if settings.redis_url
            else "Starting a private Redis",
            lambda: stack.enter_context(broker(settings, scratch_dir)),
        )
        server_url = stack.enter_context(database_server(settings))
        url = stack.enter_context(scratch_database(server_url))
        engine = progress.step(
            "Migrating the scratch database", lambda: _migrated_engine(url, settings.db_role)
        )
        stack.callback(engine.dispose)
        since = progress.step("Rules and participants", lambda: _setup(engine, plan, tag))
        celery = make_celery(replace(settings, redis_url=redis_url, database_url=url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
            "TRACE_DATABASE_URL": url,
            "TRACE_DB_ROLE": settings.db_role,
            "TRACE_REDIS_URL": redis_url,
            "TRACE_DATA_DIR": str(scratch_dir),
            "TRACE_LOG_LEVEL": "WARNING",
        }
        workers = stack.enter_context(_workers(env, scratch_dir, plan))
        ready = progress.task("Starting the workers", plan.workers)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            _check_alive(workers)
            replies = celery.control.ping(timeout=0.5) or []
            answered = sum(1 for reply in replies for name in reply if name.startswith(WORKER_PREFIX))
            progress.update(ready, answered)
            if answered >= plan.workers:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the workers were not ready within {READY_TIMEOUT_S:.0f} s")
        setup_s = time.time() - started
        rng = random.Random(7)  # noqa: S311 - reproducible bench data, not secrets
        sending = progress.task("Events accrued", plan.events)
        clock = time.perf_counter()
        batches = 0
        for first in range(0, plan.events, plan.batch):
            size = min(plan.batch, plan.events - first)
            celery.send_task(TASK_POINTS_INGEST, args=[_batch(rng, plan, tag, since, first, size)])
            batches += 1
        accrued = 0
        give_up = time.monotonic() + RUN_TIMEOUT_S
        while accrued < plan.events:
            _check_alive(workers)
            if time.monotonic() > give_up:
                raise BenchError(
                    f"only {accrued:,} of {plan.events:,} events accrued in {RUN_TIMEOUT_S:.0f} s"
                )
            time.sleep(POLL_S)
            accrued = _accrued(engine)
            progress.update(sending, accrued, f"{accrued:,}")
        seconds = time.perf_counter() - clock
        checks = progress.step("Checking the books", lambda: _checks(engine, plan))
        with engine.connect() as conn:
            points = conn.execute(sa.text("SELECT COALESCE(sum(points), 0) FROM points_events")).scalar_one()
    return PointsReport(
        events_per_s=round(plan.events / seconds, 1) if seconds > 0 else 0.0,
        target_events_per_s=TARGET_EVENTS_PER_S,
        events=plan.events,
        accrued=accrued,
        points=str(points),
        seconds=round(seconds, 3),
        batches=batches,
        batch_size=plan.batch,
        participants=plan.participants,
        workers=plan.workers,
        threads_per_worker=plan.threads,
        checks=checks,
        redis="TRACE_REDIS_URL" if settings.redis_url else "embedded",
        setup_s=round(setup_s, 1),
        scratch_database=url.rpartition("/")[2],
    )


def render_points_table(report: PointsReport) -> Table:
    table = Table(title="Points accrued through the Celery workers")
    for column in ("measure", "figure", "target"):
        table.add_column(column)
    met = "met" if report.events_per_s >= report.target_events_per_s else "missed"
    table.add_row(
        "events accrued per second",
        f"{report.events_per_s:,.0f}",
        f"≥ {report.target_events_per_s:,} — {met}",
    )
    table.add_row("events", f"{report.events:,} in {report.batches} batches of {report.batch_size:,}", "")
    table.add_row("seconds", f"{report.seconds:.1f}", "")
    table.add_row("workers", f"{report.workers} x {report.threads_per_worker} thread(s)", "")
    for name, ok in report.checks.items():
        table.add_row(name, "ok" if ok else "broken", "")
    return table


@click.command("points")
@click.option(
    "--quick", is_flag=True, help=f"{QUICK.events:,} events instead of {FULL.events:,} (under 45 s)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
@click.option("--events", type=click.IntRange(1, 10_000_000), help="Events to accrue.")
@click.option("--participants", type=click.IntRange(1, 1_000_000), help="Participants the events go to.")
@click.option("--workers", type=click.IntRange(1, 16), help="`tracechain worker` processes (default 2).")
@click.option("--threads", type=click.IntRange(1, 16), help="Threads of each worker (default 1).")
def points_bench(
    quick: bool,
    as_json: bool,
    events: int | None,
    participants: int | None,
    workers: int | None,
    threads: int | None,
) -> None:
    """Events accrued per second through the Celery workers, in batches of 10,000.

    Starts a scratch database (TRACE_DATABASE_URL's server or the embedded PostgreSQL), `tracechain
    worker` processes and, unless TRACE_REDIS_URL is set, a private Redis (a TRACE_REDIS_URL that a
    Celery worker already consumes is refused; its TraceChain queues are purged before and after).
    Prints `events_per_s`. Exits 1 if an event was lost or counted twice or the books disagree.
    """
    plan = QUICK if quick else FULL
    plan = replace(
        plan,
        events=events or plan.events,
        participants=participants or plan.participants,
        workers=workers or plan.workers,
        threads=threads or plan.threads,
    )
    settings = load_settings()
    report: PointsReport = _run(lambda console: run_points_bench(settings, plan, console))
    _emit(report, as_json, lambda: render_points_table(report))  # type: ignore[arg-type]  # as_dict() only
    if not report.checks_ok:
        failed = ", ".join(name for name, ok in report.checks.items() if not ok)
        raise BenchError(f"the points books do not check out ({failed})")
