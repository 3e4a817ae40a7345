"""The posting queue: concurrent drainers, per-account order, results aligned with submissions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import sqlalchemy as sa

from ledger import db
from ledger.accounts import create_account, create_asset, get_account
from ledger.commands import Command, EntryResult, Leg, NewEntry, Resolve
from ledger.posting import Poster, PostingQueue, _Item, _Request
from tests.books import assert_books_balance

USERS = 40


@pytest.fixture
def engine(fresh_db_url: str) -> Iterator[sa.Engine]:
    engine = db.make_engine(fresh_db_url, role="tracechain_app", pool_size=4)
    with engine.begin() as conn:
        create_asset(conn, "TRACE", 18)
        create_account(conn, "treasury", "TRACE", "equity")
        for i in range(USERS):
            create_account(conn, f"u:{i}", "TRACE", "liability", ["debits_must_not_exceed_credits"])
            create_account(conn, f"src:{i}", "TRACE", "equity")
            create_account(conn, f"sink:{i}", "TRACE", "liability")
    yield engine
    engine.dispose()


def _run_threads(queue: PostingQueue, requests: list[list[Command]]) -> list[list[EntryResult]]:
    results: list[list[EntryResult]] = [[] for _ in requests]
    errors: list[BaseException] = []

    def worker(indexes: range) -> None:
        try:
            for i in indexes:
                results[i] = queue.submit(requests[i], timeout_s=60)
        except BaseException as exc:  # reported below, the test must not hang
            errors.append(exc)

    step = max(1, len(requests) // 8)
    threads = [
        threading.Thread(target=worker, args=(range(i, min(i + step, len(requests))),))
        for i in range(0, len(requests), step)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_commands_on_one_account_keep_their_order_across_concurrent_batches(engine: sa.Engine) -> None:
    # Each pair funds u:N from src:N, then spends it all to sink:N: inverted, the spend is
    # refused. Fillers keep src:N busy, so a fund is often passed over while its spend, on
    # other accounts, could go ahead; tiny batches and two drainers book side by side.
    queue = PostingQueue(Poster(engine), batch_max=3, drainers=2)
    requests: list[list[Command]] = []
    for round_ in range(6):
        for user in range(USERS):
            requests.append([NewEntry(f"fill:{round_}:{user}", (Leg(f"src:{user}", f"sink:{user}", 1),))])
            requests.append(
                [
                    NewEntry(f"fund:{round_}:{user}", (Leg(f"src:{user}", f"u:{user}", 10),)),
                    NewEntry(f"spend:{round_}:{user}", (Leg(f"u:{user}", f"sink:{user}", 10),)),
                ]
            )
    try:
        results = _run_threads(queue, requests)
    finally:
        queue.close()
    for request, outcome in zip(requests, results, strict=True):
        assert [r.key for r in outcome] == [c.key for c in request]
        assert {r.status for r in outcome} == {"created"}, outcome
    with engine.connect() as conn:
        assert all(get_account(conn, f"u:{u}").balance == 0 for u in range(USERS))
    assert_books_balance(engine)


def test_holds_and_their_resolutions_run_alone_and_in_order(engine: sa.Engine) -> None:
    # A resolution's accounts are unknown until the ledger is read: it must never overtake
    # its hold nor run beside a batch on the same accounts.
    queue = PostingQueue(Poster(engine), batch_max=4, drainers=3)
    requests: list[list[Command]] = []
    for user in range(USERS):
        requests.append([NewEntry(f"fund:{user}", (Leg("treasury", f"u:{user}", 100),))])
        requests.append(
            [
                NewEntry(f"hold:{user}", (Leg(f"u:{user}", "treasury", 60, pending=True),)),
                Resolve(f"post:{user}", f"hold:{user}", "post", 50),
                NewEntry(f"rest:{user}", (Leg(f"u:{user}", "treasury", 50),)),
            ]
        )
    try:
        results = _run_threads(queue, requests)
    finally:
        queue.close()
    statuses = {r.key: r.status for outcome in results for r in outcome}
    assert set(statuses.values()) == {"created"}, statuses
    with engine.connect() as conn:
        for user in range(USERS):
            account = get_account(conn, f"u:{user}")
            assert (account.debits_posted, account.debits_pending, account.balance) == (100, 0, 0)
    assert_books_balance(engine)


def test_a_failing_poster_reaches_every_submitter(engine: sa.Engine) -> None:
    engine.dispose()
    broken = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", pool_pre_ping=False)
    queue = PostingQueue(Poster(broken), drainers=2)
    try:
        with pytest.raises(sa.exc.OperationalError):
            queue.submit([NewEntry("k", (Leg("treasury", "u:1", 1),))], timeout_s=30)
    finally:
        queue.close()
        broken.dispose()


def test_a_command_never_overtakes_an_earlier_one_on_the_same_account(
    engine: sa.Engine, fresh_db_url: str
) -> None:
    # A batch on src:0 is held up by a row lock taken outside; meanwhile a request funds u:0
    # from src:0 and spends it. The fund must wait for src:0, and so must the spend, which
    # touches only free accounts but comes after the fund on u:0.
    queue = PostingQueue(Poster(engine), batch_max=10, drainers=2)
    blocker = sa.create_engine(db.sqlalchemy_url(fresh_db_url))
    outcomes: dict[str, list[EntryResult]] = {}

    def submit(name: str, commands: list[Command]) -> None:
        outcomes[name] = queue.submit(commands, timeout_s=60)

    try:
        with blocker.connect() as conn:
            conn.execute(sa.text("SELECT 1 FROM ledger_accounts WHERE code = 'src:0' FOR UPDATE"))
            filler = threading.Thread(
                target=submit, args=("fill", [NewEntry("fill", (Leg("src:0", "treasury", 1),))])
            )
            filler.start()
            wait_until_waiting_on_a_lock(blocker)
            pair = threading.Thread(
                target=submit,
                args=(
                    "pair",
                    [
                        NewEntry("fund", (Leg("src:0", "u:0", 10),)),
                        NewEntry("spend", (Leg("u:0", "sink:0", 10),)),
                    ],
                ),
            )
            pair.start()
            pair.join(timeout=0.5)
            assert pair.is_alive(), "the spend went ahead of the fund it depends on"
            conn.rollback()
        filler.join(timeout=30)
        pair.join(timeout=30)
    finally:
        queue.close()
        blocker.dispose()
    assert [r.status for r in outcomes["fill"]] == ["created"]
    assert [r.status for r in outcomes["pair"]] == ["created", "created"]


def wait_until_waiting_on_a_lock(engine: sa.Engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("no batch started waiting on the row lock")


def test_nothing_joins_while_a_command_of_unknown_accounts_is_booked(engine: sa.Engine) -> None:
    # A void runs alone: its accounts are known only once the hold is read. While such a batch
    # is in flight, a lingering drainer must not book the spend of the funds it releases.
    poster = Poster(engine)
    funded = poster.post(
        [
            NewEntry("fund", (Leg("src:1", "u:1", 100),)),
            NewEntry("hold", (Leg("u:1", "sink:1", 100, pending=True),)),
        ]
    )
    assert [r.status for r in funded] == ["created", "created"]
    queue = PostingQueue(poster, batch_max=3, linger_ms=200, drainers=2)
    void = Resolve("void", "hold", "void")
    outcome: list[EntryResult] = []
    try:
        spend = threading.Thread(
            target=lambda: outcome.extend(
                queue.submit([NewEntry("spend", (Leg("u:1", "sink:3", 100),))], timeout_s=60)
            )
        )
        spend.start()
        time.sleep(0.05)  # a drainer saw the spend and lingers (200 ms) for more work
        # Meanwhile another drainer takes the void (submitted earlier) as an exclusive batch.
        with queue._cond:
            claimed = queue._claim([_Item(_Request(None, Future(), [None], 1), 0, void, None)])
        spend.join(timeout=0.6)  # three linger periods
        assert spend.is_alive() and not outcome, "a batch was booked beside an exclusive one"
        assert [r.status for r in poster.post([void])] == ["created"]
        with queue._cond:
            queue._release(*claimed)
            queue._cond.notify_all()
        spend.join(timeout=30)
    finally:
        queue.close()
    assert [r.status for r in outcome] == ["created"], outcome
