"""The engine under real concurrency: several OS processes, each with its own engine and Poster.

Every worker returns plain tuples (key, status, code, entry_id); an exception that escapes the
Poster comes back as status "error", which no test accepts: callers must only ever see
created, exists or rejected with a domain code.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import ThreadPoolExecutor as Threads
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from ledger import db
from ledger.accounts import create_account, create_asset
from ledger.commands import Command, Leg, NewEntry, Resolve
from ledger.expiry import expire_holds
from ledger.posting import Poster, PostingQueue
from tests.books import assert_books_balance, totals, wait_for_lock_waiters
from tests.conftest import APP_ROLE

PROCESSES = 6
DOMAIN_CODES = {"exceeds_credits", "exceeds_debits", "pending_already_resolved", "idempotency_conflict"}

Outcome = tuple[str, str, str | None, int | None]


# --- what runs in the worker processes -------------------------------------------------


def _warm_up(delay_s: float) -> int:
    time.sleep(delay_s)  # keep this worker busy so that the pool starts all of them
    return multiprocessing.current_process().pid or 0


def _engine(url: str) -> sa.Engine:
    engine = db.make_engine(url, role=APP_ROLE, pool_size=2)
    with engine.connect():
        pass  # connect (and SET ROLE) before the race starts
    return engine


def _sleep_until(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def post_batches(url: str, batches: Sequence[Sequence[Command]], start_at: float) -> list[Outcome]:
    """Book each batch with Poster.post, one transaction each, starting at ``start_at``."""
    engine = _engine(url)
    poster = Poster(engine)
    out: list[Outcome] = []
    try:
        _sleep_until(start_at)
        for batch in batches:
            try:
                out.extend((r.key, r.status, r.code, r.entry_id) for r in poster.post(batch))
            except Exception as exc:
                out.extend((c.key, "error", f"{type(exc).__name__}: {exc}", None) for c in batch)
    finally:
        engine.dispose()
    return out


def submit_through_queue(
    url: str, requests: Sequence[Sequence[Command]], threads: int, start_at: float
) -> list[Outcome]:
    """Submit ``requests`` from ``threads`` threads to one PostingQueue of this process."""
    engine = _engine(url)
    queue = PostingQueue(Poster(engine), batch_max=64, linger_ms=2, drainers=2)

    def submit(request: Sequence[Command]) -> list[Outcome]:
        try:
            return [(r.key, r.status, r.code, r.entry_id) for r in queue.submit(request)]
        except Exception as exc:
            return [(c.key, "error", f"{type(exc).__name__}: {exc}", None) for c in request]

    try:
        _sleep_until(start_at)
        with Threads(max_workers=threads) as pool:
            return [o for outcomes in pool.map(submit, requests) for o in outcomes]
    finally:
        queue.close()
        engine.dispose()


def sweep_expired(url: str, start_at: float) -> list[Outcome]:
    engine = _engine(url)
    try:
        _sleep_until(start_at)
        try:
            return [(r.key, r.status, r.code, r.entry_id) for r in expire_holds(Poster(engine))]
        except Exception as exc:
            return [("sweep", "error", f"{type(exc).__name__}: {exc}", None)]
    finally:
        engine.dispose()


# --- fixtures and helpers --------------------------------------------------------------


@pytest.fixture(scope="module")
def processes() -> Iterator[ProcessPoolExecutor]:
    """Worker processes (spawned: no state inherited from pytest), started once for the module."""
    with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=multiprocessing.get_context("spawn")) as pool:
        pids = set(pool.map(_warm_up, [0.5] * PROCESSES))
        assert len(pids) == PROCESSES
        yield pool


class Books:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = db.make_engine(url, role=APP_ROLE, pool_size=2)
        with self.engine.begin() as conn:
            create_asset(conn, "TRACE", 18)
            create_account(conn, "bank", "TRACE", "asset")
            create_account(conn, "fees", "TRACE", "revenue")
            create_account(conn, "shop", "TRACE", "liability")

    def open(self, code: str, flags: Sequence[str] = ()) -> None:
        with self.engine.begin() as conn:
            create_account(conn, code, "TRACE", "liability", flags)

    def post(self, *commands: Command) -> None:
        results = Poster(self.engine).post(list(commands))
        assert all(r.status == "created" for r in results), results

    def totals(self, code: str) -> tuple[int, int, int, int]:
        return totals(self.engine, code)

    def check(self) -> dict[str, Any]:
        return assert_books_balance(self.engine)


@pytest.fixture
def books(fresh_db_url: str) -> Iterator[Books]:
    ledger = Books(fresh_db_url)
    yield ledger
    ledger.engine.dispose()


def gather(futures: Sequence[Future[list[Outcome]]]) -> list[Outcome]:
    outcomes = [o for f in futures for o in f.result(timeout=120)]
    errors = [o for o in outcomes if o[1] == "error"]
    assert not errors, errors[:3]
    return outcomes


class LockGate:
    """Holds the row locks of some accounts so that every racer is queued behind them."""

    def __init__(self, url: str, codes: Sequence[str]) -> None:
        self.url = url
        self.conn = psycopg.connect(db.libpq_url(url))
        self.conn.execute("SELECT 1 FROM ledger_accounts WHERE code = ANY(%s) FOR UPDATE", (list(codes),))

    def open_when_waiting(self, racers: int) -> None:
        wait_for_lock_waiters(self.url, racers)
        self.conn.commit()
        self.conn.close()


# --- (a) racing overdrafts -------------------------------------------------------------


def test_racing_overdrafts_book_exactly_what_the_credits_allow(
    books: Books, processes: ProcessPoolExecutor
) -> None:
    spends_allowed, attempts_each, amount = 12, 5, 10
    books.open("wallet", ["debits_must_not_exceed_credits"])
    books.post(NewEntry("fund", (Leg("bank", "wallet", spends_allowed * amount),)))
    start_at = time.time() + 0.3
    futures = [
        processes.submit(
            post_batches,
            books.url,
            [
                # Holds count against the limit exactly like posted spends.
                [NewEntry(f"p{p}-{i}", (Leg("wallet", "shop", amount, pending=(i % 2 == 1)),))]
                for i in range(attempts_each)
            ],
            start_at,
        )
        for p in range(PROCESSES)
    ]
    lowest_available = _watch_available(books, "wallet", futures)
    outcomes = gather(futures)

    statuses = Counter((status, code) for _key, status, code, _id in outcomes)
    assert statuses == {
        ("created", None): spends_allowed,
        ("rejected", "exceeds_credits"): PROCESSES * attempts_each - spends_allowed,
    }
    debits_posted, credits_posted, debits_pending, _ = books.totals("wallet")
    assert credits_posted == spends_allowed * amount
    assert debits_posted + debits_pending == credits_posted
    assert lowest_available >= 0
    report = books.check()
    assert report["entries"] == 1 + spends_allowed


def _watch_available(books: Books, code: str, futures: Sequence[Future[Any]]) -> int:
    """Poll what ``code`` has left to spend while the racers run; returns the lowest value seen."""
    lowest = None
    while True:
        dp, cp, dq, _ = books.totals(code)
        lowest = cp - dp - dq if lowest is None else min(lowest, cp - dp - dq)
        if all(f.done() for f in futures):
            return lowest
        time.sleep(0.005)


# --- (b) a hot account -----------------------------------------------------------------


def _fee_requests(process: int, count: int, funded: int) -> list[list[NewEntry]]:
    rng = random.Random(process)
    # Sized so that some payers run out of funds near the end and get rejected.
    return [
        [
            NewEntry(
                f"fee-{process}-{i}", (Leg(f"payer-{process}", "fees", rng.randint(1, 2 * funded // count)),)
            )
        ]
        for i in range(count)
    ]


def _assert_fees_conserved(books: Books, outcomes: list[Outcome], requests: dict[str, int]) -> None:
    for _key, status, code, _id in outcomes:
        assert status == "created" or (status == "rejected" and code in DOMAIN_CODES), (status, code)
    accepted = {key for key, status, _code, _id in outcomes if status == "created"}
    assert len({key for key, *_ in outcomes}) == len(outcomes) == len(requests)
    _, fees_credited, _, _ = books.totals("fees")
    assert fees_credited == sum(requests[key] for key in accepted)
    for p in range(PROCESSES):
        payer_debits, payer_credits, _, _ = books.totals(f"payer-{p}")
        assert payer_debits == sum(requests[k] for k in accepted if k.startswith(f"fee-{p}-"))
        assert payer_debits <= payer_credits
    assert any(status == "rejected" for _k, status, _c, _i in outcomes), "no payer ran out: size the test"
    books.check()


@pytest.fixture
def payers(books: Books) -> int:
    funded = 1000
    for p in range(PROCESSES):
        books.open(f"payer-{p}", ["debits_must_not_exceed_credits"])
    books.post(*[NewEntry(f"fund-{p}", (Leg("bank", f"payer-{p}", funded),)) for p in range(PROCESSES)])
    return funded


def test_a_hot_fee_account_conserves_every_unit(
    books: Books, payers: int, processes: ProcessPoolExecutor
) -> None:
    per_process = 60
    all_requests = {p: _fee_requests(p, per_process, payers) for p in range(PROCESSES)}
    start_at = time.time() + 0.3
    futures = [
        # Batches of 1 to 4 commands, so batches of different processes interleave.
        processes.submit(post_batches, books.url, _chunks(all_requests[p], [1, 4, 2, 3]), start_at)
        for p in range(PROCESSES)
    ]
    outcomes = gather(futures)
    amounts = {c.key: c.legs[0].amount for reqs in all_requests.values() for r in reqs for c in r}
    assert len(outcomes) == PROCESSES * per_process
    _assert_fees_conserved(books, outcomes, amounts)


def test_a_hot_fee_account_through_posting_queues(
    books: Books, payers: int, processes: ProcessPoolExecutor
) -> None:
    per_process = 60
    all_requests = {p: _fee_requests(p, per_process, payers) for p in range(PROCESSES)}
    start_at = time.time() + 0.3
    futures = [
        processes.submit(submit_through_queue, books.url, all_requests[p], 4, start_at)
        for p in range(PROCESSES)
    ]
    outcomes = gather(futures)
    amounts = {c.key: c.legs[0].amount for reqs in all_requests.values() for r in reqs for c in r}
    assert len(outcomes) == PROCESSES * per_process
    _assert_fees_conserved(books, outcomes, amounts)
    with books.engine.connect() as conn:
        entries_per_batch = conn.execute(
            sa.text("SELECT count(*) FROM ledger_entries GROUP BY posted_at ORDER BY count(*) DESC LIMIT 1")
        ).scalar_one()
    assert entries_per_batch > 1, "the queues never coalesced two requests into one batch"


def _chunks(requests: list[list[NewEntry]], sizes: list[int]) -> list[list[NewEntry]]:
    flat = [c for r in requests for c in r]
    out: list[list[NewEntry]] = []
    i = 0
    while i < len(flat):
        size = sizes[len(out) % len(sizes)]
        out.append(flat[i : i + size])
        i += size
    return out


# --- (c) one idempotency key, many processes -------------------------------------------


def test_the_same_key_from_many_processes_is_booked_once(
    books: Books, processes: ProcessPoolExecutor
) -> None:
    command = NewEntry("once", (Leg("bank", "shop", 42),), metadata={"order": "o-1"})
    # Every racer reads the key (absent), then queues behind the gate on the account locks.
    gate = LockGate(books.url, ["bank", "shop"])
    futures = [processes.submit(post_batches, books.url, [[command]], 0.0) for _ in range(PROCESSES)]
    gate.open_when_waiting(PROCESSES)
    outcomes = gather(futures)
    assert sorted(status for _k, status, _c, _i in outcomes) == ["created"] + ["exists"] * (PROCESSES - 1)
    assert len({entry_id for *_rest, entry_id in outcomes}) == 1
    assert books.totals("shop") == (0, 42, 0, 0)
    books.check()


def test_the_same_key_from_many_processes_without_a_race_on_the_read(
    books: Books, processes: ProcessPoolExecutor
) -> None:
    command = NewEntry("once", (Leg("bank", "shop", 42),), metadata={"order": "o-1"})
    books.post(command)
    start_at = time.time() + 0.3
    futures = [processes.submit(post_batches, books.url, [[command]] * 5, start_at) for _ in range(PROCESSES)]
    outcomes = gather(futures)
    assert {status for _k, status, _c, _i in outcomes} == {"exists"}
    assert books.totals("shop") == (0, 42, 0, 0)


# --- (d) one hold, many processes ------------------------------------------------------


def test_the_same_hold_resolved_from_many_processes_is_resolved_once(
    books: Books, processes: ProcessPoolExecutor
) -> None:
    books.open("buyer", ["debits_must_not_exceed_credits"])
    books.post(
        NewEntry("fund", (Leg("bank", "buyer", 100),)),
        NewEntry("hold", (Leg("buyer", "shop", 100, pending=True),)),
    )
    # Every racer sees the hold open before it queues behind the gate.
    gate = LockGate(books.url, ["buyer", "shop"])
    actions: list[Command] = [
        Resolve(f"post-{p}", "hold", "post", amount=100 - p)
        if p % 2 == 0
        else Resolve(f"void-{p}", "hold", "void")
        for p in range(PROCESSES)
    ]
    futures = [processes.submit(post_batches, books.url, [[action]], 0.0) for action in actions]
    gate.open_when_waiting(PROCESSES)
    outcomes = gather(futures)
    created = [key for key, status, _c, _i in outcomes if status == "created"]
    assert len(created) == 1
    assert Counter(code for _k, status, code, _i in outcomes if status == "rejected") == {
        "pending_already_resolved": PROCESSES - 1
    }
    winner = created[0]
    posted = 100 - int(winner.split("-")[1]) if winner.startswith("post") else 0
    assert books.totals("buyer") == (posted, 100, 0, 0)
    assert books.totals("shop") == (0, posted, 0, 0)
    books.check()


def test_concurrent_expiry_sweeps_expire_each_hold_once(books: Books, processes: ProcessPoolExecutor) -> None:
    books.open("buyer", ["debits_must_not_exceed_credits"])
    books.post(NewEntry("fund", (Leg("bank", "buyer", 1000),)))
    books.post(
        *[NewEntry(f"hold-{i}", (Leg("buyer", "shop", i + 1, pending=True, timeout_s=1),)) for i in range(40)]
    )
    books.post(NewEntry("kept", (Leg("buyer", "shop", 7, pending=True, timeout_s=3600),)))
    start_at = time.time() + 1.2
    futures = [processes.submit(sweep_expired, books.url, start_at) for _ in range(PROCESSES)]
    outcomes = gather(futures)
    created = Counter(key for key, status, _c, _i in outcomes if status == "created")
    assert len(created) == 40
    assert set(created.values()) == {1}
    assert {code for _k, status, code, _i in outcomes if status == "rejected"} <= {"pending_already_resolved"}
    assert books.totals("buyer") == (0, 1000, 7, 0)
    report = books.check()
    assert (report["open_holds"], report["expired_holds_awaiting_sweep"]) == (1, 0)
