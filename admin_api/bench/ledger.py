"""`tracechain bench ledger`: the measured speed of the ledger engine, next to a baseline.

Everything runs in a scratch database created for the run on the configured server
(``TRACE_DATABASE_URL``, else the embedded PostgreSQL under ``TRACE_DATA_DIR``) and dropped at
the end, whatever happens, so real books are never touched. Three measures:

* **random transfers** among 10,000 funded accounts, booked by many producer threads (and
  optionally processes) through :class:`ledger.posting.PostingQueue`, the way the API and
  the workers book them (producers submit several entries at once, as worker tasks do; a
  second figure has 256 producers submitting one entry each, as API requests do);
* **hot account**: every transfer credits one fee account;
* **API latency**: one entry POSTed at a time to the real admin API (gunicorn on a free port,
  HTTP keep-alive), p50 and p99.

The baseline is the classic one-transaction-per-transfer design (pgledger's): a PL/pgSQL
function that locks the two accounts ``FOR UPDATE`` in id order, checks the limit, inserts
the transfer with both resulting balances and updates the two balances. It runs on its own
tables (``bench_accounts``/``bench_transfers``: an idempotency key, two history indexes, no
triggers) with the same number of producers, which share at most
``BASELINE_POOL_MAX`` connections per process (more connections only slow PostgreSQL down on a
small machine), so the baseline is measured at its best.

Each phase starts after ``VACUUM (ANALYZE)``, as autovacuum keeps a live database. Counts
are honest: only entries the engine reports ``created`` count, they are compared with
the rows in the database, and ``ledger.check.check_ledger`` must find the books balanced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.synchronize
import os
import queue
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import click
import httpx
import psycopg
import sqlalchemy as sa
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ledger import db
from ledger.accounts import create_account, create_asset
from ledger.check import check_ledger
from ledger.commands import Leg, NewEntry
from ledger.posting import Poster, PostingQueue
from ledger.settings import Settings, load_settings

ASSET = "TRACE"
ASSET_SCALE = 18
EQUITY = "bench:equity"
FEES = "bench:fees"
USER_PREFIX = "bench:user:"
FUNDING_BASE_UNITS = 10**27  # 1e9 TRACE per account: random transfers never exhaust it
TRANSFER_MAX_BASE_UNITS = 10**21  # up to 1,000 TRACE, any base-unit amount
FUND_BATCH = 2_000
BASELINE_POOL_MAX = 16
API_STAFF_ROLE = "finance"
GUNICORN_START_TIMEOUT_S = 30.0
CHILD_READY_TIMEOUT_S = 60.0
PHASE_GRACE_S = 60.0
SCRATCH_PREFIX = "tracechain_bench_"

# Entry kinds, one per phase, so the rows each phase created can be counted back.
KIND_FUND = "bench.fund"
KIND_WARMUP = "bench.warmup"
KIND_RANDOM = "bench.random"
KIND_HOT = "bench.hot"
KIND_API = "bench.api"
KIND_API_WARMUP = "bench.api-warmup"

TARGET_ENGINE_TPS = 20_000
TARGET_ENGINE_RATIO = 3.0
TARGET_HOT_TPS = 5_000
TARGET_HOT_RATIO = 5.0
TARGET_API_P99_MS = 25.0

Target = Literal["engine", "baseline"]
Pattern = Literal["random", "hot"]


class BenchError(click.ClickException):
    """The benchmark could not produce honest figures."""


# --- plans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """How the load is driven: producers and the posting queue's settings."""

    processes: int
    producers: int  # threads per process
    per_submit: int  # entries a producer submits at once (one transaction each for the baseline)
    batch_max: int
    linger_ms: float
    drainers: int

    @property
    def total_producers(self) -> int:
        return self.processes * self.producers


@dataclass(frozen=True)
class Plan:
    name: str
    accounts: int
    random_s: float
    hot_s: float
    api_requests: int
    api_warmup: int
    knobs: Knobs
    # The API-like load: this many producers submitting one entry each (engine only).
    single_producers: int = 256


# Chosen by measurement on a 2-core machine: 48 producers x 64 entries with batch_max 3000 gave
# the most once balance updates stopped paying for the account code's regex (migration 0012)
# and the collector stopped running dozens of times a batch (TRACE_GC_GEN0_THRESHOLD); 16 or 32
# producers with batch_max 1000-2000 about 5-10 % less; per_submit 1 with 64-512 producers
# 3-4k/s (as before); a linger or a third drainer less, as batches then wait on each other's
# account locks.
DEFAULT_KNOBS = Knobs(processes=1, producers=48, per_submit=64, batch_max=3000, linger_ms=0.0, drainers=2)
QUICK = Plan(
    "quick", accounts=10_000, random_s=4.0, hot_s=3.0, api_requests=300, api_warmup=30, knobs=DEFAULT_KNOBS
)
FULL = Plan(
    "full", accounts=10_000, random_s=20.0, hot_s=15.0, api_requests=2000, api_warmup=100, knobs=DEFAULT_KNOBS
)


# --- the scratch database --------------------------------------------------------------------


def _database_url(server_url: str, name: str) -> str:
    url = sa.engine.make_url(db.sqlalchemy_url(server_url)).set(database=name)
    return db.libpq_url(url.render_as_string(hide_password=False))


@contextlib.contextmanager
def shielded_from_interrupts() -> Iterator[None]:
    """Let clean-up finish even if Ctrl-C is pressed again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the scratch database is still dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """Create an empty database ``tracechain_bench_<random>`` on the server; drop it afterwards."""
    name = SCRATCH_PREFIX + secrets.token_hex(6)
    admin_url = db.libpq_url(server_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _database_url(server_url, name)
    finally:
        with shielded_from_interrupts(), psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def user_code(index: int) -> str:
    return f"{USER_PREFIX}{index}"


def _populate_ledger(url: str, role: str, accounts: int) -> None:
    """The asset, an equity and a fee account, ``accounts`` limited users, each funded."""
    engine = db.make_engine(url, role=role, pool_size=1)
    try:
        with engine.begin() as conn:
            asset, _ = create_asset(conn, ASSET, ASSET_SCALE)
            create_account(conn, EQUITY, ASSET, "equity")
            create_account(conn, FEES, ASSET, "liability")
            # One statement instead of 10,000 create_account calls: setup is not measured, and
            # the account guard trigger and constraints still check every row.
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_accounts (code, asset_id, kind, debits_must_not_exceed_credits)"
                    " SELECT :prefix || g, :asset_id, 'liability', true FROM generate_series(0, :n - 1) g"
                ),
                {"prefix": USER_PREFIX, "asset_id": asset.id, "n": accounts},
            )
        poster = Poster(engine)
        for start in range(0, accounts, FUND_BATCH):
            commands = [
                NewEntry(f"bench:fund:{i}", (Leg(EQUITY, user_code(i), FUNDING_BASE_UNITS),), kind=KIND_FUND)
                for i in range(start, min(accounts, start + FUND_BATCH))
            ]
            refused = [r for r in poster.post(commands) if r.status != "created"]
            if refused:
                raise BenchError(f"funding the accounts failed: {refused[0]}")
    finally:
        engine.dispose()


_BASELINE_SCHEMA = """
CREATE TABLE bench_accounts (
    id bigint PRIMARY KEY,
    debits_must_not_exceed_credits boolean NOT NULL,
    debits_posted numeric NOT NULL DEFAULT 0,
    credits_posted numeric NOT NULL DEFAULT 0,
    CONSTRAINT debits_must_not_exceed_credits
        CHECK (NOT debits_must_not_exceed_credits OR debits_posted <= credits_posted)
);
CREATE TABLE bench_transfers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    debit_account_id bigint NOT NULL,
    credit_account_id bigint NOT NULL,
    amount numeric(78, 0) NOT NULL CHECK (amount > 0),
    debit_posted_after numeric NOT NULL,
    credit_posted_after numeric NOT NULL,
    posted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bench_transfers_debit_history ON bench_transfers (debit_account_id, id);
CREATE INDEX bench_transfers_credit_history ON bench_transfers (credit_account_id, id);

-- One transaction per transfer (the caller runs it in autocommit): lock both accounts in id
-- order, check the limit, insert the transfer with the resulting balances, update both.
-- Returns the transfer id, or NULL when the limit refuses it.
CREATE FUNCTION bench_transfer(p_key text, p_debit bigint, p_credit bigint, p_amount numeric)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    d bench_accounts;
    c bench_accounts;
    transfer_id bigint;
BEGIN
    PERFORM 1 FROM bench_accounts WHERE id IN (p_debit, p_credit) ORDER BY id FOR UPDATE;
    SELECT * INTO STRICT d FROM bench_accounts WHERE id = p_debit;
    SELECT * INTO STRICT c FROM bench_accounts WHERE id = p_credit;
    IF d.debits_must_not_exceed_credits AND d.debits_posted + p_amount > d.credits_posted THEN
        RETURN NULL;
    END IF;
    INSERT INTO bench_transfers (idempotency_key, debit_account_id, credit_account_id, amount,
                                 debit_posted_after, credit_posted_after)
    VALUES (p_key, p_debit, p_credit, p_amount, d.debits_posted + p_amount, c.credits_posted + p_amount)
    RETURNING id INTO transfer_id;
    UPDATE bench_accounts SET debits_posted = debits_posted + p_amount WHERE id = p_debit;
    UPDATE bench_accounts SET credits_posted = credits_posted + p_amount WHERE id = p_credit;
    RETURN transfer_id;
END $$;
"""


def baseline_fee_id(accounts: int) -> int:
    return accounts


def _baseline_equity_id(accounts: int) -> int:
    return accounts + 1


def _populate_baseline(url: str, accounts: int) -> None:
    """The baseline's tables and function, its users funded as in the ledger (ids 0..n-1)."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(_BASELINE_SCHEMA)
        conn.execute(
            "INSERT INTO bench_accounts (id, debits_must_not_exceed_credits, credits_posted)"
            " SELECT g, true, %(funding)s FROM generate_series(0, %(n)s - 1) g",
            {"funding": FUNDING_BASE_UNITS, "n": accounts},
        )
        conn.execute(
            "INSERT INTO bench_accounts (id, debits_must_not_exceed_credits, debits_posted)"
            " VALUES (%(fee)s, false, 0), (%(equity)s, false, %(total)s)",
            {
                "fee": baseline_fee_id(accounts),
                "equity": _baseline_equity_id(accounts),
                "total": FUNDING_BASE_UNITS * accounts,
            },
        )


# --- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """What one process of producers does (picklable: it travels to child processes)."""

    url: str
    role: str
    target: Target
    pattern: Pattern
    accounts: int
    producers: int
    per_submit: int
    batch_max: int
    linger_ms: float
    drainers: int
    key_prefix: str
    seed: int


@dataclass
class LoadResult:
    created: int = 0
    refused: int = 0
    errors: int = 0
    submits: int = 0
    finished_at: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class PhaseResult:
    """One measured phase: transfers created in ``elapsed_s`` by ``producers``."""

    created: int
    refused: int
    elapsed_s: float
    producers: int
    submits: int

    @property
    def tps(self) -> float:
        return self.created / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tps": round(self.tps, 1)}


@dataclass
class _Tally:
    created: int = 0
    refused: int = 0
    errors: int = 0
    submits: int = 0
    error: str | None = None


class _Transfers:
    """Random transfers of one producer: amounts, accounts and unique keys."""

    def __init__(self, spec: LoadSpec, producer: int) -> None:
        self.rng = random.Random(spec.seed * 1_000_003 + producer)  # noqa: S311 - load, not secrets
        self.accounts = spec.accounts
        self.hot = spec.pattern == "hot"
        self.key = f"{spec.key_prefix}:{producer}:"
        self.seq = 0

    def next(self) -> tuple[str, int, int, int]:
        """(key, debit index, credit index or -1 for the fee account, amount)."""
        rng = self.rng
        debit = rng.randrange(self.accounts)
        if self.hot:
            credit = -1
        else:
            credit = rng.randrange(self.accounts - 1)
            if credit >= debit:
                credit += 1
        self.seq += 1
        return f"{self.key}{self.seq}", debit, credit, rng.randint(1, TRANSFER_MAX_BASE_UNITS)


class _Booker(Protocol):
    def book(self, transfers: _Transfers, count: int) -> tuple[int, int]: ...

    def close(self) -> None: ...


class _EngineBooker:
    """Books through a posting queue of this process, as the API and workers do."""

    def __init__(self, spec: LoadSpec) -> None:
        self.kind = KIND_HOT if spec.pattern == "hot" else KIND_RANDOM
        self.codes = [user_code(i) for i in range(spec.accounts)]
        self.engine = db.make_engine(spec.url, role=spec.role, pool_size=spec.drainers + 1)
        self.queue = PostingQueue(
            Poster(self.engine),
            batch_max=spec.batch_max,
            linger_ms=spec.linger_ms,
            drainers=spec.drainers,
            queue_max=max(10_000, 2 * spec.producers),
        )
        # Opens the drainers' connections before the clock starts.
        warmup = [
            NewEntry(f"{spec.key_prefix}:warmup:{i}", (Leg(EQUITY, FEES, 1),), kind=KIND_WARMUP)
            for i in range(spec.drainers)
        ]
        self.queue.submit(warmup)

    def book(self, transfers: _Transfers, count: int) -> tuple[int, int]:
        codes = self.codes
        commands = []
        for _ in range(count):
            key, debit, credit, amount = transfers.next()
            leg = Leg(codes[debit], FEES if credit < 0 else codes[credit], amount)
            commands.append(NewEntry(key, (leg,), kind=self.kind))
        results = self.queue.submit(commands)
        created = sum(1 for r in results if r.status == "created")
        return created, len(results) - created

    def close(self) -> None:
        self.queue.close()
        self.engine.dispose()


class _BaselineBooker:
    """One transaction per transfer through ``bench_transfer``; producers share a small pool."""

    def __init__(self, spec: LoadSpec) -> None:
        self.fee = baseline_fee_id(spec.accounts)
        self.pool: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self.connections = [
            psycopg.connect(spec.url, autocommit=True) for _ in range(min(spec.producers, BASELINE_POOL_MAX))
        ]
        for conn in self.connections:
            self.pool.put(conn)

    def book(self, transfers: _Transfers, count: int) -> tuple[int, int]:
        created = 0
        for _ in range(count):
            key, debit, credit, amount = transfers.next()
            conn = self.pool.get()
            try:
                row = conn.execute(
                    "SELECT bench_transfer(%s, %s, %s, %s)",
                    (key, debit, self.fee if credit < 0 else credit, amount),
                    prepare=True,
                ).fetchone()
            finally:
                self.pool.put(conn)
            if row is not None and row[0] is not None:
                created += 1
        return created, count - created

    def close(self) -> None:
        for conn in self.connections:
            conn.close()


class LoadGroup:
    """The producer threads of one process, started together on :meth:`start`."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.booker: _Booker = _EngineBooker(spec) if spec.target == "engine" else _BaselineBooker(spec)
        self.tallies = [_Tally() for _ in range(spec.producers)]
        self._go = threading.Event()
        self._stop = threading.Event()
        self._deadline = 0.0
        self._threads = [
            threading.Thread(target=self._produce, args=(k,), name=f"bench-producer-{k}", daemon=True)
            for k in range(spec.producers)
        ]
        for thread in self._threads:
            thread.start()

    def start(self, t0: float, duration_s: float) -> None:
        self._deadline = t0 + duration_s
        self._go.set()

    def created(self) -> int:
        return sum(t.created for t in self.tallies)

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self._go.set()

    def finish(self) -> LoadResult:
        """Wait for the producers; release the connections; the summed tallies."""
        try:
            for thread in self._threads:
                thread.join(timeout=self._deadline - time.time() + PHASE_GRACE_S)
            finished_at = time.time()
            if self.running():
                raise BenchError("producers did not finish within a minute of the deadline")
        finally:
            self.stop()
            self.booker.close()
        errors = [t.error for t in self.tallies if t.error]
        return LoadResult(
            created=sum(t.created for t in self.tallies),
            refused=sum(t.refused for t in self.tallies),
            errors=sum(t.errors for t in self.tallies),
            submits=sum(t.submits for t in self.tallies),
            finished_at=finished_at,
            error=errors[0] if errors else None,
        )

    def _produce(self, k: int) -> None:
        tally = self.tallies[k]
        transfers = _Transfers(self.spec, k)
        self._go.wait()
        while not self._stop.is_set() and time.time() < self._deadline:
            try:
                created, refused = self.booker.book(transfers, self.spec.per_submit)
            except Exception as exc:  # reported with the figures; the phase then fails
                tally.errors += 1
                tally.error = f"{type(exc).__name__}: {exc}"
                return
            tally.created += created
            tally.refused += refused
            tally.submits += 1


def _child_main(
    spec: LoadSpec,
    duration_s: float,
    ready: multiprocessing.synchronize.Event,
    go: multiprocessing.synchronize.Event,
    t0: Any,
    live: Any,
    results: multiprocessing.Queue[tuple[str, LoadResult | str]],
) -> None:
    """A producer process: set up, wait for the common start, run, report."""
    try:
        group = LoadGroup(spec)
    except Exception as exc:
        results.put((spec.key_prefix, f"{type(exc).__name__}: {exc}"))
        ready.set()
        return
    ready.set()
    go.wait()
    group.start(float(t0.value), duration_s)
    while group.running():
        live.value = group.created()
        time.sleep(0.1)
    live.value = group.created()
    results.put((spec.key_prefix, group.finish()))


class BenchProgress:
    """Rich progress on stderr: one task per phase."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> BenchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def task(self, description: str, total: float) -> TaskID:
        return self.progress.add_task(description, total=total, detail="")

    def update(self, task: TaskID, completed: float, detail: str = "") -> None:
        self.progress.update(task, completed=completed, detail=detail)

    def step(self, description: str, work: Callable[[], Any]) -> Any:
        task = self.task(description, 1)
        value = work()
        self.update(task, 1, "done")
        return value


def vacuum_analyze(url: str) -> None:
    """VACUUM ANALYZE between phases, as autovacuum keeps a live database.

    Each phase adds tens of thousands of rows and leaves a dead version of an account row per
    balance update. Without this, every phase would pay for the previous one's garbage (later
    phases measured slower whatever they were) and the planner, without statistics, would pick
    sequential scans that a running system would not (reading an entry back after booking it
    took ~9 ms instead of ~1 ms).
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")


def measure_load(
    base: LoadSpec, knobs: Knobs, duration_s: float, progress: BenchProgress, label: str
) -> PhaseResult:
    """Run ``knobs.processes`` groups of producers for ``duration_s``; count what was created."""
    vacuum_analyze(base.url)
    specs = [
        replace(base, key_prefix=f"{base.key_prefix}.{p}", seed=base.seed * 100 + p)
        for p in range(knobs.processes)
    ]
    task = progress.task(label, duration_s)
    if knobs.processes == 1:
        results = [_run_here(specs[0], duration_s, progress, task)]
    else:
        results = _run_in_processes(specs, duration_s, progress, task)
    t0, outcomes = results[0][0], [r for _, r in results]
    failed = [r.error for r in outcomes if r.error or r.errors]
    if failed:
        raise BenchError(f"{label}: a producer failed: {failed[0]}")
    elapsed = max(r.finished_at for r in outcomes) - t0
    phase = PhaseResult(
        created=sum(r.created for r in outcomes),
        refused=sum(r.refused for r in outcomes),
        elapsed_s=round(elapsed, 3),
        producers=knobs.total_producers,
        submits=sum(r.submits for r in outcomes),
    )
    progress.update(task, duration_s, f"{phase.tps:,.0f} transfers/s")
    return phase


def _run_here(
    spec: LoadSpec, duration_s: float, progress: BenchProgress, task: TaskID
) -> tuple[float, LoadResult]:
    group = LoadGroup(spec)
    try:
        t0 = time.time()
        group.start(t0, duration_s)
        while group.running():
            elapsed = time.time() - t0
            progress.update(task, min(elapsed, duration_s), _live_detail(group.created(), elapsed))
            time.sleep(0.2)
        return t0, group.finish()
    finally:
        group.stop()


def _run_in_processes(
    specs: list[LoadSpec], duration_s: float, progress: BenchProgress, task: TaskID
) -> list[tuple[float, LoadResult]]:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    t0 = ctx.Value("d", 0.0)
    results: multiprocessing.Queue[tuple[str, LoadResult | str]] = ctx.Queue()
    children: list[tuple[multiprocessing.context.SpawnProcess, Any, multiprocessing.synchronize.Event]] = []
    try:
        for spec in specs:
            ready = ctx.Event()
            live = ctx.Value("q", 0, lock=False)
            child = ctx.Process(
                target=_child_main,
                args=(spec, duration_s, ready, go, t0, live, results),
                name=f"bench-{spec.key_prefix}",
                daemon=True,
            )
            child.start()
            children.append((child, live, ready))
        for child, _live, ready in children:
            if not ready.wait(CHILD_READY_TIMEOUT_S):
                raise BenchError(f"{child.name} did not get ready within {CHILD_READY_TIMEOUT_S:.0f} s")
        t0.value = time.time()
        go.set()
        outcomes: list[tuple[float, LoadResult]] = []
        deadline = t0.value + duration_s + PHASE_GRACE_S
        while len(outcomes) < len(children):
            try:
                _prefix, outcome = results.get(timeout=0.2)
            except queue.Empty:
                elapsed = time.time() - t0.value
                created = sum(int(live.value) for _c, live, _r in children)
                progress.update(task, min(elapsed, duration_s), _live_detail(created, elapsed))
                if time.time() > deadline or not any(c.is_alive() for c, _l, _r in children):
                    raise BenchError("a producer process died or hung") from None
                continue
            if isinstance(outcome, str):
                raise BenchError(f"a producer process could not start: {outcome}")
            outcomes.append((float(t0.value), outcome))
        return outcomes
    finally:
        for child, _live, _ready in children:
            child.join(timeout=10)
            if child.is_alive():
                child.terminate()
                child.join(timeout=5)


def _live_detail(created: int, elapsed_s: float) -> str:
    rate = created / elapsed_s if elapsed_s > 0.05 else 0.0
    return f"{created:,} created, {rate:,.0f}/s"


# --- API latency -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiResult:
    mode: Literal["gunicorn", "test_client"]
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    requests: int
    fallback_reason: str | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _entry_body(rng: random.Random, accounts: int, kind: str) -> dict[str, Any]:
    debit = rng.randrange(accounts)
    credit = (debit + 1 + rng.randrange(accounts - 1)) % accounts
    amount = rng.randint(1, TRANSFER_MAX_BASE_UNITS)
    return {
        "kind": kind,
        "transfers": [{"debit": user_code(debit), "credit": user_code(credit), "amount": str(amount)}],
    }


def _time_requests(
    post: Callable[[str, dict[str, Any]], int],
    accounts: int,
    requests: int,
    warmup: int,
    progress: BenchProgress,
    label: str,
) -> list[float]:
    """POST ``warmup`` then ``requests`` entries one at a time; the latencies of the latter (ms)."""
    rng = random.Random(20260101)  # noqa: S311 - load, not secrets
    run = secrets.token_hex(4)
    task = progress.task(label, warmup + requests)
    latencies: list[float] = []
    for i in range(warmup + requests):
        warming = i < warmup
        body = _entry_body(rng, accounts, KIND_API_WARMUP if warming else KIND_API)
        key = f"bench:api:{run}:{i}"
        started = time.perf_counter()
        status = post(key, body)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if status != 201:
            raise BenchError(f"POST /entries answered {status} instead of 201 (request {i})")
        if not warming:
            latencies.append(elapsed_ms)
        if i % 20 == 0 or i == warmup + requests - 1:
            detail = f"p50 {statistics.median(latencies):.1f} ms" if latencies else "warming up"
            progress.update(task, i + 1, detail)
    return latencies


def _summarise(
    mode: Literal["gunicorn", "test_client"], latencies: list[float], reason: str | None
) -> ApiResult:
    ordered = sorted(latencies)
    p99 = statistics.quantiles(ordered, n=100, method="inclusive")[98] if len(ordered) > 1 else ordered[0]
    return ApiResult(
        mode=mode,
        p50_ms=round(statistics.median(ordered), 3),
        p99_ms=round(p99, 3),
        mean_ms=round(statistics.fmean(ordered), 3),
        max_ms=round(ordered[-1], 3),
        requests=len(ordered),
        fallback_reason=reason,
    )


def _create_staff_key(url: str, role: str) -> str:
    from admin_api.auth import create_api_key

    engine = db.make_engine(url, role=role, pool_size=1)
    try:
        with engine.begin() as conn:
            return create_api_key(conn, API_STAFF_ROLE, "tracechain bench ledger")
    finally:
        engine.dispose()


def measure_api(
    url: str, settings: Settings, plan: Plan, progress: BenchProgress, *, allow_gunicorn: bool = True
) -> ApiResult:
    """p50/p99 of one entry POSTed at a time; gunicorn over HTTP, else the Flask test client."""
    api_key = _create_staff_key(url, settings.db_role)
    reason = "--no-gunicorn given" if not allow_gunicorn else None
    if allow_gunicorn:
        try:
            latencies = _measure_gunicorn(url, settings, plan, api_key, progress)
            return _summarise("gunicorn", latencies, None)
        except _GunicornUnavailable as exc:
            reason = str(exc)
    latencies = _measure_test_client(url, settings, plan, api_key, progress)
    return _summarise("test_client", latencies, reason)


class _GunicornUnavailable(Exception):
    pass


def _measure_gunicorn(
    url: str, settings: Settings, plan: Plan, api_key: str, progress: BenchProgress
) -> list[float]:
    port = _free_port()
    env = {**os.environ, "TRACE_DATABASE_URL": url, "TRACE_DB_ROLE": settings.db_role}
    command = [
        sys.executable, "-m", "gunicorn",
        "--bind", f"127.0.0.1:{port}",
        "--workers", "1",
        "--worker-class", "gthread",
        "--threads", "4",
        "--keep-alive", "75",
        "--log-level", "warning",
        "admin_api.app:make_wsgi_app()",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tracechain-bench-") as tmp:
        log_path = Path(tmp) / "gunicorn.log"
        with log_path.open("wb") as log:
            try:
                server = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            except OSError as exc:
                raise _GunicornUnavailable(f"cannot run gunicorn: {exc}") from exc
        try:
            base_url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {api_key}"}
            with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client:
                _wait_for_server(client, server, log_path)

                def post(key: str, body: dict[str, Any]) -> int:
                    return client.post("/entries", json=body, headers={"Idempotency-Key": key}).status_code

                return _time_requests(
                    post, plan.accounts, plan.api_requests, plan.api_warmup, progress,
                    "API latency (gunicorn, HTTP keep-alive)",
                )  # fmt: skip
        finally:
            _stop_process(server)


def _wait_for_server(client: httpx.Client, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + GUNICORN_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise _GunicornUnavailable(f"gunicorn exited with code {server.returncode}: {tail.strip()}")
        with contextlib.suppress(httpx.HTTPError):
            if client.get("/healthz").status_code == 200:
                return
        time.sleep(0.1)
    raise _GunicornUnavailable(f"gunicorn did not answer within {GUNICORN_START_TIMEOUT_S:.0f} s")


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _measure_test_client(
    url: str, settings: Settings, plan: Plan, api_key: str, progress: BenchProgress
) -> list[float]:
    from admin_api.app import close_app, create_app

    app = create_app(settings, database_url=url)
    try:
        client = app.test_client()
        headers = {"Authorization": f"Bearer {api_key}"}

        def post(key: str, body: dict[str, Any]) -> int:
            return client.post("/entries", json=body, headers={**headers, "Idempotency-Key": key}).status_code

        return _time_requests(
            post,
            plan.accounts,
            plan.api_requests,
            plan.api_warmup,
            progress,
            "API latency (Flask test client)",
        )
    finally:
        close_app(app)


# --- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    check_ok: bool
    counts_ok: bool
    baseline_ok: bool
    entries_by_kind: dict[str, int]
    baseline_transfers: int
    check_breaks: int


def verify(url: str, role: str, expected: dict[str, int], baseline_expected: int) -> Verification:
    """The engine's books balance, and every counted transfer is a row (and no more)."""
    engine = db.make_engine(url, role=role, pool_size=1)
    try:
        with engine.connect() as conn:
            summary = check_ledger(conn)
            by_kind = {
                str(kind): int(n)
                for kind, n in conn.execute(
                    sa.text("SELECT kind, count(*) FROM ledger_entries GROUP BY kind")
                )
            }
            one_transfer_each = conn.execute(
                sa.text("SELECT count(*) = (SELECT count(*) FROM ledger_entries) FROM ledger_transfers")
            ).scalar_one()
            conn.rollback()
    finally:
        engine.dispose()
    counts_ok = bool(one_transfer_each) and all(by_kind.get(k, 0) == n for k, n in expected.items())
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM bench_transfers),"
            " (SELECT sum(debits_posted) = sum(credits_posted) FROM bench_accounts),"
            " (SELECT count(*) = 0 FROM bench_accounts"
            "   WHERE debits_must_not_exceed_credits AND debits_posted > credits_posted)"
        ).fetchone()
    if row is None:
        raise BenchError("the baseline tables are gone")
    baseline_transfers, balanced, within_limits = int(row[0]), bool(row[1]), bool(row[2])
    return Verification(
        check_ok=bool(summary["ok"]),
        counts_ok=counts_ok,
        baseline_ok=balanced and within_limits and baseline_transfers == baseline_expected,
        entries_by_kind=by_kind,
        baseline_transfers=baseline_transfers,
        check_breaks=int(summary["break_count"]),
    )


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Report:
    plan: Plan
    random_engine: PhaseResult
    random_single: PhaseResult
    random_baseline: PhaseResult
    hot_engine: PhaseResult
    hot_baseline: PhaseResult
    api: ApiResult
    verification: Verification
    setup_s: float
    duration_s: float
    server_version: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return _ratio(self.random_engine.tps, self.random_baseline.tps)

    @property
    def hot_ratio(self) -> float:
        return _ratio(self.hot_engine.tps, self.hot_baseline.tps)

    def targets(self) -> dict[str, bool]:
        return {
            "engine": self.random_engine.tps >= TARGET_ENGINE_TPS and self.ratio >= TARGET_ENGINE_RATIO,
            "hot": self.hot_engine.tps >= TARGET_HOT_TPS and self.hot_ratio >= TARGET_HOT_RATIO,
            "api": self.api.p99_ms <= TARGET_API_P99_MS,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine_tps": round(self.random_engine.tps, 1),
            "baseline_tps": round(self.random_baseline.tps, 1),
            "ratio": round(self.ratio, 3),
            "hot_engine_tps": round(self.hot_engine.tps, 1),
            "hot_baseline_tps": round(self.hot_baseline.tps, 1),
            "hot_ratio": round(self.hot_ratio, 3),
            "engine_single_entry_tps": round(self.random_single.tps, 1),
            "api_p50_ms": self.api.p50_ms,
            "api_p99_ms": self.api.p99_ms,
            "check_ok": self.verification.check_ok,
            "counts_ok": self.verification.counts_ok,
            "baseline_ok": self.verification.baseline_ok,
            "targets_met": self.targets(),
            "mode": self.plan.name,
            "api_mode": self.api.mode,
            "api": asdict(self.api),
            "knobs": {**asdict(self.plan.knobs), "baseline_pool_max": BASELINE_POOL_MAX},
            "accounts": self.plan.accounts,
            "phases": {
                "random_engine": self.random_engine.as_dict(),
                "random_engine_single_entry": self.random_single.as_dict(),
                "random_baseline": self.random_baseline.as_dict(),
                "hot_engine": self.hot_engine.as_dict(),
                "hot_baseline": self.hot_baseline.as_dict(),
            },
            "entries_by_kind": self.verification.entries_by_kind,
            "baseline_transfers": self.verification.baseline_transfers,
            "setup_s": round(self.setup_s, 3),
            "duration_s": round(self.duration_s, 3),
            "server_version": self.server_version,
            **self.extras,
        }


def _ratio(engine_tps: float, baseline_tps: float) -> float:
    return engine_tps / baseline_tps if baseline_tps > 0 else 0.0


def run_ledger_bench(
    settings: Settings, plan: Plan, console: Console, *, server_url: str | None = None, api: bool = True
) -> Report:
    """Create the scratch database, measure every phase, verify, drop the database."""
    started = time.time()
    service = None
    if server_url is None:
        server_url = settings.database_url
    if server_url is None:
        from admin_api.embedded import start_postgres

        service = start_postgres(settings.data_dir)
        server_url = service.url
    try:
        with (
            terminate_as_interrupt(),
            BenchProgress(console) as progress,
            scratch_database(server_url) as url,
        ):
            return _run_in(url, settings, plan, progress, started, api=api)
    finally:
        if service is not None:
            with shielded_from_interrupts():
                service.stop()


def _run_in(
    url: str, settings: Settings, plan: Plan, progress: BenchProgress, started: float, *, api: bool
) -> Report:
    role = settings.db_role
    setup_started = time.time()
    progress.step("Migrating the scratch database", lambda: db.upgrade(url, role=role))
    progress.step(
        f"Creating and funding {plan.accounts:,} accounts", lambda: _populate_ledger(url, role, plan.accounts)
    )
    progress.step("Creating the baseline tables", lambda: _populate_baseline(url, plan.accounts))
    setup_s = time.time() - setup_started
    with psycopg.connect(url) as conn:
        version_row = conn.execute("SHOW server_version").fetchone()
    knobs = plan.knobs
    run = secrets.token_hex(3)

    def spec(target: Target, pattern: Pattern) -> LoadSpec:
        return LoadSpec(
            url=url,
            role=role,
            target=target,
            pattern=pattern,
            accounts=plan.accounts,
            producers=knobs.producers,
            per_submit=knobs.per_submit,
            batch_max=knobs.batch_max,
            linger_ms=knobs.linger_ms,
            drainers=knobs.drainers,
            key_prefix=f"bench:{pattern}:{target}:{run}",
            seed=7 if pattern == "random" else 11,
        )

    producers = f"{knobs.total_producers} producers"
    random_engine = measure_load(
        spec("engine", "random"), knobs, plan.random_s, progress, f"Engine, random transfers ({producers})"
    )
    single_knobs = replace(knobs, processes=1, producers=plan.single_producers, per_submit=1)
    random_single = measure_load(
        replace(
            spec("engine", "random"),
            producers=plan.single_producers,
            per_submit=1,
            key_prefix=f"bench:one:{run}",
        ),
        single_knobs,
        plan.hot_s,
        progress,
        f"Engine, random transfers, one entry a submit ({plan.single_producers} producers)",
    )
    random_baseline = measure_load(
        spec("baseline", "random"),
        knobs,
        plan.random_s,
        progress,
        f"Baseline, random transfers ({producers})",
    )
    hot_engine = measure_load(
        spec("engine", "hot"), knobs, plan.hot_s, progress, f"Engine, hot account ({producers})"
    )
    hot_baseline = measure_load(
        spec("baseline", "hot"), knobs, plan.hot_s, progress, f"Baseline, hot account ({producers})"
    )
    vacuum_analyze(url)
    api_result = measure_api(url, settings, plan, progress, allow_gunicorn=api)
    expected = {
        KIND_RANDOM: random_engine.created + random_single.created,
        KIND_HOT: hot_engine.created,
        KIND_API: api_result.requests,
        KIND_API_WARMUP: plan.api_warmup,
        KIND_FUND: plan.accounts,
    }
    verification = progress.step(
        "Checking the books (ledger check)",
        lambda: verify(url, role, expected, random_baseline.created + hot_baseline.created),
    )
    return Report(
        plan=plan,
        random_engine=random_engine,
        random_single=random_single,
        random_baseline=random_baseline,
        hot_engine=hot_engine,
        hot_baseline=hot_baseline,
        api=api_result,
        verification=verification,
        setup_s=setup_s,
        duration_s=time.time() - started,
        server_version=str(version_row[0]) if version_row else "",
        extras={"scratch_database": sa.engine.make_url(db.sqlalchemy_url(url)).database},
    )


# --- output ----------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "[green]pass[/]" if ok else "[red]miss[/]"


def render_table(report: Report) -> Table:
    knobs = report.plan.knobs
    targets = report.targets()
    table = Table(
        title=f"Ledger engine benchmark ({report.plan.name}, {report.plan.accounts:,} accounts)",
        caption=(
            f"{knobs.total_producers} producers ({knobs.processes} process(es) x {knobs.producers} threads,"
            f" {knobs.per_submit} entries a submit); posting queue batch_max={knobs.batch_max},"
            f" linger_ms={knobs.linger_ms}, drainers={knobs.drainers}. Baseline: one transaction per"
            f" transfer (pgledger style), same producers, pool of <= {BASELINE_POOL_MAX} connections."
            f" API measured with {report.api.mode}."
        ),
    )
    for column in ("Measure", "Engine", "Baseline", "Ratio", "Target", "Result"):
        table.add_column(column, justify="left" if column in ("Measure", "Target") else "right")
    table.add_row(
        "Random transfers",
        f"{report.random_engine.tps:,.0f}/s",
        f"{report.random_baseline.tps:,.0f}/s",
        f"{report.ratio:.2f}x",
        f">= {TARGET_ENGINE_TPS:,}/s and >= {TARGET_ENGINE_RATIO:g}x",
        _mark(targets["engine"]),
    )
    table.add_row(
        f"  one entry a submit ({report.plan.single_producers} producers, API-like)",
        f"{report.random_single.tps:,.0f}/s",
        "",
        f"{_ratio(report.random_single.tps, report.random_baseline.tps):.2f}x",
        "",
        "",
    )
    table.add_row(
        "Hot fee account",
        f"{report.hot_engine.tps:,.0f}/s",
        f"{report.hot_baseline.tps:,.0f}/s",
        f"{report.hot_ratio:.2f}x",
        f">= {TARGET_HOT_TPS:,}/s and >= {TARGET_HOT_RATIO:g}x",
        _mark(targets["hot"]),
    )
    table.add_row("API POST /entries p50", f"{report.api.p50_ms:.1f} ms", "", "", "", "")
    table.add_row(
        "API POST /entries p99",
        f"{report.api.p99_ms:.1f} ms",
        "",
        "",
        f"<= {TARGET_API_P99_MS:g} ms",
        _mark(targets["api"]),
    )
    verification = report.verification
    table.add_row(
        "Books balance (ledger check)",
        "ok" if verification.check_ok else f"{verification.check_breaks} breaks",
        "ok" if verification.baseline_ok else "broken",
        "",
        "every count matches the rows",
        _mark(verification.check_ok and verification.counts_ok and verification.baseline_ok),
    )
    return table


@click.command("ledger")
@click.option("--quick", is_flag=True, help="Shorter runs (under 45 s); fewer samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
@click.option("--producers", type=click.IntRange(1, 4096), help="Producer threads per process.")
@click.option("--processes", type=click.IntRange(1, 16), help="Producer processes.")
@click.option("--per-submit", type=click.IntRange(1, 1000), help="Entries a producer submits at once.")
@click.option("--batch-max", type=click.IntRange(1, 20_000), help="Posting queue batch_max.")
@click.option("--linger-ms", type=click.FloatRange(0, 1000), help="Posting queue linger_ms.")
@click.option("--drainers", type=click.IntRange(1, 16), help="Posting queue drainer threads.")
@click.option("--seconds", type=click.FloatRange(0.5, 600), help="Duration of each throughput phase.")
@click.option("--no-gunicorn", is_flag=True, help="Measure the API with the Flask test client.")
def ledger_bench(
    quick: bool,
    as_json: bool,
    producers: int | None,
    processes: int | None,
    per_submit: int | None,
    batch_max: int | None,
    linger_ms: float | None,
    drainers: int | None,
    seconds: float | None,
    no_gunicorn: bool,
) -> None:
    """Throughput of the ledger engine against a one-transaction-per-transfer baseline, and API latency.

    Runs in a scratch database on TRACE_DATABASE_URL's server (or the embedded PostgreSQL),
    dropped at the end. Exits 1 if the books do not balance or a count does not match.
    """
    plan = QUICK if quick else FULL
    default = plan.knobs
    knobs = Knobs(
        processes=processes or default.processes,
        producers=producers or default.producers,
        per_submit=per_submit or default.per_submit,
        batch_max=batch_max or default.batch_max,
        linger_ms=default.linger_ms if linger_ms is None else linger_ms,
        drainers=drainers or default.drainers,
    )
    plan = replace(plan, knobs=knobs)
    if seconds is not None:
        plan = replace(plan, random_s=seconds, hot_s=seconds)
    settings = load_settings()
    # One line per HTTP request or migration step would bury the progress display.
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stderr = Console(stderr=True)
    try:
        report = run_ledger_bench(settings, plan, stderr, api=not no_gunicorn)
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted; the scratch database was dropped[/]")
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        stdout = Console()
        if not stdout.is_terminal:
            stdout = Console(width=140)
        stdout.print(render_table(report))
    verification = report.verification
    if not (verification.check_ok and verification.counts_ok and verification.baseline_ok):
        raise BenchError("the books or the counts do not check out (see check_ok, counts_ok, baseline_ok)")
