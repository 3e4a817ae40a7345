"""The ledger engine against a real PostgreSQL: entries, holds, idempotency, reversals, history."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from ledger import db
from ledger.accounts import create_account, create_asset, get_account, set_closed
from ledger.audit import Actor
from ledger.check import check_ledger
from ledger.commands import (
    BATCH_MAX_COMMANDS,
    ChainRef,
    Command,
    EntryResult,
    Leg,
    NewEntry,
    Resolve,
    Reverse,
)
from ledger.engine import post_batch
from ledger.errors import Conflict, LedgerError
from ledger.expiry import expire_holds
from ledger.history import balance, statement
from ledger.posting import Poster, PostingQueue
from tests.books import assert_books_balance, totals, wait_for_lock_waiters
from tests.conftest import APP_ROLE

TX = "0x" + "11" * 32
BLOCK = "0x" + "22" * 32


class Books:
    """A fresh ledger: the app-role engine, a Poster, and short ways to read it back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = db.make_engine(url, role=APP_ROLE)
        self.poster = Poster(self.engine)
        with self.engine.begin() as conn:
            create_asset(conn, "TRACE", 18)
            create_asset(conn, "PTS", 0)
        # bank: where deposits come from (unlimited); users cannot spend more than they hold.
        self.open("bank", "asset")
        for user in ("alice", "bob", "carol"):
            self.open(user, "liability", ["debits_must_not_exceed_credits"])
        self.open("merchant", "liability")
        self.open("fees", "revenue")

    def open(self, code: str, kind: str, flags: Iterable[str] = (), asset: str = "TRACE") -> None:
        with self.engine.begin() as conn:
            create_account(conn, code, asset, kind, flags)

    def post(self, *commands: Command, actors: list[Actor | None] | None = None) -> list[EntryResult]:
        results = self.poster.post(list(commands), actors)
        assert [r.key for r in results] == [c.key for c in commands]
        return results

    def one(self, command: Command) -> EntryResult:
        return self.post(command)[0]

    def created(self, command: Command) -> int:
        result = self.one(command)
        assert result.status == "created", result
        assert result.entry_id is not None
        return result.entry_id

    def deposit(self, key: str, code: str, amount: int) -> int:
        return self.created(NewEntry(key, (Leg("bank", code, amount),), kind="deposit"))

    def totals(self, code: str) -> tuple[int, int, int, int]:
        """(debits_posted, credits_posted, debits_pending, credits_pending)."""
        return totals(self.engine, code)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]

    def counts(self) -> tuple[int, int]:
        return (
            self.scalar("SELECT count(*) FROM ledger_entries"),
            self.scalar("SELECT count(*) FROM ledger_transfers"),
        )

    def check(self) -> dict[str, Any]:
        return assert_books_balance(self.engine)


@pytest.fixture
def books(fresh_db_url: str) -> Iterator[Books]:
    ledger = Books(fresh_db_url)
    yield ledger
    ledger.engine.dispose()


def rejected(result: EntryResult, code: str) -> None:
    assert (result.status, result.code, result.entry_id) == ("rejected", code, None), result
    assert result.reason


# --- posted entries --------------------------------------------------------------------


def test_a_posted_entry_moves_balances_and_records_running_balances(books: Books) -> None:
    entry_id = books.created(
        NewEntry("dep-1", (Leg("bank", "alice", 100),), kind="deposit", metadata={"ref": "wire-7"})
    )
    books.created(NewEntry("dep-2", (Leg("bank", "alice", 5), Leg("bank", "bob", 7)), kind="deposit"))

    assert books.totals("bank") == (112, 0, 0, 0)
    assert books.totals("alice") == (0, 105, 0, 0)
    assert books.totals("bob") == (0, 7, 0, 0)
    entry = books.rows(
        "SELECT idempotency_key, kind, metadata, effective_at = posted_at, reverses_entry_id, chain_id"
        " FROM ledger_entries WHERE id = :id",
        id=entry_id,
    )[0]
    assert tuple(entry) == ("dep-1", "deposit", {"ref": "wire-7"}, True, None, None)
    transfers = books.rows(
        "SELECT t.kind, d.code, c.code, t.amount::text, t.debit_posted_after::text,"
        " t.credit_posted_after::text, t.debit_pending_after::text, t.credit_pending_after::text"
        " FROM ledger_transfers t JOIN ledger_accounts d ON d.id = t.debit_account_id"
        " JOIN ledger_accounts c ON c.id = t.credit_account_id ORDER BY t.id"
    )
    assert [tuple(t) for t in transfers] == [
        ("posted", "bank", "alice", "100", "100", "100", "0", "0"),
        ("posted", "bank", "alice", "5", "105", "105", "0", "0"),
        ("posted", "bank", "bob", "7", "112", "7", "0", "0"),
    ]
    books.check()


def test_uint256_sized_amounts_are_booked_exactly(books: Books) -> None:
    big = 2**256 - 1
    books.open("whale", "liability")
    books.created(NewEntry("w1", (Leg("bank", "whale", big),)))
    books.created(NewEntry("w2", (Leg("bank", "whale", big),)))
    # Balances are sums of amounts, so they may pass 2^256 without losing a unit.
    assert books.totals("whale") == (0, 2 * big, 0, 0)
    books.check()


def test_effective_time_and_chain_reference_are_stored(books: Books) -> None:
    when = datetime.fromisoformat("2026-01-02T03:04:05+00:00")
    entry_id = books.created(
        NewEntry(
            "chain:1:x:0",
            (Leg("bank", "alice", 9),),
            effective_at=when,
            chain=ChainRef(1, TX, 4, 77, BLOCK),
        )
    )
    row = books.rows(
        "SELECT e.effective_at, e.chain_id, e.tx_hash, e.log_index, e.block_number, e.block_hash,"
        " t.block_number FROM ledger_entries e JOIN ledger_transfers t ON t.entry_id = e.id"
        " WHERE e.id = :id",
        id=entry_id,
    )[0]
    assert tuple(row) == (when, 1, TX, 4, 77, BLOCK, 77)


def test_an_entry_is_atomic_and_a_failing_entry_does_not_stop_its_batch_mates(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    before = books.counts()
    results = books.post(
        NewEntry("a", (Leg("bank", "carol", 5),)),
        # 60 + 30 + 20 > 100: the third leg fails, so the first two must not be booked either.
        NewEntry("b", (Leg("alice", "bob", 60), Leg("alice", "merchant", 30), Leg("alice", "fees", 20))),
        NewEntry("c", (Leg("alice", "bob", 60), Leg("bob", "nobody", 1))),
        NewEntry("d", (Leg("alice", "bob", 90), Leg("bob", "merchant", 40))),
    )
    assert [r.status for r in results] == ["created", "rejected", "rejected", "created"]
    rejected(results[1], "exceeds_credits")
    rejected(results[2], "unknown_account")
    assert books.counts() == (before[0] + 2, before[1] + 3)
    assert books.rows("SELECT idempotency_key FROM ledger_entries WHERE idempotency_key IN ('b', 'c')") == []
    assert books.totals("alice") == (90, 100, 0, 0)
    assert books.totals("bob") == (40, 90, 0, 0)
    assert books.totals("merchant") == (0, 40, 0, 0)
    assert books.totals("fees") == (0, 0, 0, 0)
    assert books.totals("carol") == (0, 5, 0, 0)
    books.check()


def test_limits_apply_to_the_whole_entry_whatever_the_leg_order(books: Books) -> None:
    # An entry applies atomically, so a limit is checked on its net effect (as the CHECK
    # constraints of ledger_accounts are at the end of the insert statement).
    books.created(NewEntry("in-out", (Leg("bank", "alice", 50), Leg("alice", "bob", 50))))
    books.created(NewEntry("out-in", (Leg("alice", "bob", 50), Leg("bank", "alice", 50))))
    assert books.totals("alice") == (100, 100, 0, 0)
    rejected(
        books.one(NewEntry("net-over", (Leg("alice", "bob", 51), Leg("bank", "alice", 50)))),
        "exceeds_credits",
    )
    assert books.totals("alice") == (100, 100, 0, 0)


def test_credit_limited_accounts_refuse_credits_above_debits(books: Books) -> None:
    books.open("receivable", "asset", ["credits_must_not_exceed_debits"])
    books.created(NewEntry("owe", (Leg("receivable", "merchant", 30),)))
    rejected(books.one(NewEntry("overpay", (Leg("merchant", "receivable", 31),))), "exceeds_debits")
    books.created(NewEntry("pay", (Leg("merchant", "receivable", 30),)))
    assert books.totals("receivable") == (30, 30, 0, 0)
    books.check()


# --- holds -----------------------------------------------------------------------------


def test_holds_reduce_the_funds_available(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold-1", (Leg("alice", "merchant", 60, pending=True),)))
    assert books.totals("alice") == (0, 100, 60, 0)
    assert books.totals("merchant") == (0, 0, 0, 60)
    rejected(books.one(NewEntry("spend-50", (Leg("alice", "bob", 50),))), "exceeds_credits")
    books.created(NewEntry("spend-40", (Leg("alice", "bob", 40),)))
    rejected(books.one(NewEntry("hold-2", (Leg("alice", "bob", 1, pending=True),))), "exceeds_credits")
    assert books.totals("alice") == (40, 100, 60, 0)
    books.check()


def test_posting_a_hold_in_full(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    post_id = books.created(Resolve("post", "hold", "post"))
    assert books.totals("alice") == (60, 100, 0, 0)
    assert books.totals("merchant") == (0, 60, 0, 0)
    row = books.rows(
        "SELECT t.kind, t.amount::text, t.pending_id = h.id FROM ledger_transfers t, ledger_transfers h"
        " JOIN ledger_entries he ON he.id = h.entry_id AND he.idempotency_key = 'hold'"
        " WHERE t.entry_id = :id",
        id=post_id,
    )
    assert [tuple(r) for r in row] == [("post_pending", "60", True)]
    assert books.scalar("SELECT kind FROM ledger_entries WHERE id = :id", id=post_id) == "post_pending"
    books.check()


def test_posting_part_of_a_hold_releases_the_rest(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    books.created(Resolve("post-25", "hold", "post", amount=25))
    assert books.totals("alice") == (25, 100, 0, 0)
    assert books.totals("merchant") == (0, 25, 0, 0)
    books.created(NewEntry("spend-rest", (Leg("alice", "bob", 75),)))
    rejected(books.one(NewEntry("spend-more", (Leg("alice", "bob", 1),))), "exceeds_credits")
    books.check()


def test_voiding_a_hold_releases_all_of_it(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    books.created(Resolve("void", "hold", "void"))
    assert books.totals("alice") == (0, 100, 0, 0)
    assert books.totals("merchant") == (0, 0, 0, 0)
    books.created(NewEntry("spend-all", (Leg("alice", "bob", 100),)))
    books.check()


def test_a_hold_is_resolved_at_most_once(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    first = books.created(Resolve("post", "hold", "post", amount=10))
    before = books.counts()
    again = books.one(Resolve("post", "hold", "post", amount=10))
    assert (again.status, again.entry_id) == ("exists", first)
    rejected(books.one(Resolve("post-again", "hold", "post", amount=10)), "pending_already_resolved")
    rejected(books.one(Resolve("void-after-post", "hold", "void")), "pending_already_resolved")
    assert books.counts() == before
    assert books.totals("alice") == (10, 100, 0, 0)
    books.check()


def test_resolve_refusals(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    before = books.counts()
    rejected(books.one(Resolve("too-much", "hold", "post", amount=61)), "exceeds_pending_amount")
    rejected(books.one(Resolve("ghost", "no-such-hold", "post")), "unknown_pending")
    rejected(books.one(Resolve("not-hold", "fund", "void")), "not_a_hold")
    rejected(books.one(Resolve("early", "hold", "expire")), "pending_not_expired")
    assert books.counts() == before
    assert books.totals("alice") == (0, 100, 60, 0)
    # A resolution entry is not a hold either.
    books.created(Resolve("post", "hold", "post"))
    rejected(books.one(Resolve("resolve-a-resolution", "post", "void")), "not_a_hold")


def test_a_hold_booked_resolved_and_reversed_in_one_batch(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    results = books.post(
        NewEntry("hold", (Leg("alice", "merchant", 70, pending=True),)),
        Resolve("post", "hold", "post", amount=30),
        Resolve("void", "hold", "void"),
        Reverse("rev", "post"),
        Reverse("rev-again", "post"),
    )
    assert [r.status for r in results] == ["created", "created", "rejected", "created", "rejected"]
    rejected(results[2], "pending_already_resolved")
    rejected(results[4], "already_reversed")
    assert (
        books.scalar("SELECT reverses_entry_id FROM ledger_entries WHERE id = :id", id=results[3].entry_id)
        == results[1].entry_id
    )
    assert books.totals("alice") == (30, 130, 0, 0)
    assert books.totals("merchant") == (30, 30, 0, 0)
    books.check()


def test_timeouts_expire_only_timed_out_holds(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    short_a = books.created(NewEntry("short-a", (Leg("alice", "merchant", 10, pending=True, timeout_s=1),)))
    short_b = books.created(NewEntry("short-b", (Leg("alice", "merchant", 20, pending=True, timeout_s=1),)))
    books.created(NewEntry("long", (Leg("alice", "merchant", 30, pending=True, timeout_s=3600),)))
    books.created(NewEntry("forever", (Leg("alice", "merchant", 40, pending=True),)))
    timeouts = {
        row[0]: row[1]
        for row in books.rows(
            "SELECT e.idempotency_key, t.timeout_at - t.posted_at FROM ledger_transfers t"
            " JOIN ledger_entries e ON e.id = t.entry_id WHERE t.kind = 'pending'"
        )
    }
    assert timeouts == {
        "short-a": timedelta(seconds=1),
        "short-b": timedelta(seconds=1),
        "long": timedelta(hours=1),
        "forever": None,
    }
    time.sleep(1.1)

    # A timed-out hold can no longer be posted or voided, even before the sweep ran.
    rejected(books.one(Resolve("late-post", "short-a", "post")), "pending_expired")
    rejected(books.one(Resolve("late-void", "short-a", "void")), "pending_expired")
    rejected(books.one(Resolve("early", "long", "expire")), "pending_not_expired")

    results = expire_holds(books.poster)
    assert sorted((r.key, r.status) for r in results) == [
        (f"sys:expire:{short_a}", "created"),
        (f"sys:expire:{short_b}", "created"),
    ]
    assert books.totals("alice") == (0, 100, 70, 0)
    assert books.totals("merchant") == (0, 0, 0, 70)
    kinds = books.rows("SELECT kind FROM ledger_entries WHERE idempotency_key LIKE 'sys:expire:%'")
    assert [k[0] for k in kinds] == ["expire", "expire"]

    # Expiry is idempotent: a second sweep finds nothing; the same expiry again is "exists".
    before = books.counts()
    assert expire_holds(books.poster) == []
    again = books.one(Resolve(f"sys:expire:{short_a}", "short-a", "expire"))
    assert again.status == "exists"
    rejected(books.one(Resolve("post-expired", "short-b", "post")), "pending_already_resolved")
    assert books.counts() == before
    report = books.check()
    assert report["open_holds"] == 2
    assert report["expired_holds_awaiting_sweep"] == 0


# --- idempotency -----------------------------------------------------------------------


def test_the_same_key_with_the_same_content_returns_the_original_entry(books: Books) -> None:
    command = NewEntry("pay-1", (Leg("bank", "alice", 100),), metadata={"a": 1, "b": 2})
    entry_id = books.created(command)
    before = books.counts()
    # Rebuilt from scratch with metadata in another order: the same content.
    retry = NewEntry("pay-1", (Leg("bank", "alice", 100),), metadata={"b": 2, "a": 1})
    assert [(r.status, r.entry_id) for r in books.post(retry, retry)] == [
        ("exists", entry_id),
        ("exists", entry_id),
    ]
    assert books.counts() == before
    assert books.totals("alice") == (0, 100, 0, 0)


def test_the_same_key_with_other_content_is_an_idempotency_conflict(books: Books) -> None:
    books.created(NewEntry("pay-1", (Leg("bank", "alice", 100),)))
    before = books.counts()
    for other in (
        NewEntry("pay-1", (Leg("bank", "alice", 101),)),
        NewEntry("pay-1", (Leg("bank", "alice", 100),), kind="deposit"),
        NewEntry("pay-1", (Leg("bank", "alice", 100),), metadata={"x": "y"}),
        Resolve("pay-1", "pay-1", "void"),
        Reverse("pay-1", "pay-1"),
    ):
        rejected(books.one(other), "idempotency_conflict")
    assert books.counts() == before
    assert books.totals("alice") == (0, 100, 0, 0)


def test_idempotency_within_one_batch(books: Books) -> None:
    first = NewEntry("k", (Leg("bank", "alice", 10),))
    results = books.post(
        first,
        NewEntry("k", (Leg("bank", "alice", 10),)),
        NewEntry("k", (Leg("bank", "alice", 11),)),
        # A rejected command does not take its key: the key stays free for a later command.
        NewEntry("free", (Leg("alice", "bob", 1000),)),
        NewEntry("free", (Leg("alice", "bob", 5),)),
    )
    assert [r.status for r in results] == ["created", "exists", "rejected", "rejected", "created"]
    assert results[1].entry_id == results[0].entry_id
    rejected(results[2], "idempotency_conflict")
    rejected(results[3], "exceeds_credits")
    assert books.totals("alice") == (5, 10, 0, 0)
    assert books.scalar("SELECT count(*) FROM ledger_entries WHERE idempotency_key = 'k'") == 1


# --- reversals -------------------------------------------------------------------------


def test_a_reversal_mirrors_the_transfers_of_an_entry(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    pay_id = books.created(NewEntry("pay", (Leg("alice", "bob", 30), Leg("alice", "fees", 2))))
    rev_id = books.created(Reverse("rev", "pay", metadata={"why": "duplicate charge"}))
    legs = books.rows(
        "SELECT t.entry_id, t.kind, d.code, c.code, t.amount::text FROM ledger_transfers t"
        " JOIN ledger_accounts d ON d.id = t.debit_account_id"
        " JOIN ledger_accounts c ON c.id = t.credit_account_id"
        " WHERE t.entry_id IN (:a, :b) ORDER BY t.id",
        a=pay_id,
        b=rev_id,
    )
    assert [tuple(r) for r in legs] == [
        (pay_id, "posted", "alice", "bob", "30"),
        (pay_id, "posted", "alice", "fees", "2"),
        (rev_id, "posted", "bob", "alice", "30"),
        (rev_id, "posted", "fees", "alice", "2"),
    ]
    entry = books.rows(
        "SELECT kind, reverses_entry_id, metadata FROM ledger_entries WHERE id = :id", id=rev_id
    )[0]
    assert tuple(entry) == ("reversal", pay_id, {"why": "duplicate charge"})
    with books.engine.connect() as conn:
        assert get_account(conn, "alice").balance == 100
        assert get_account(conn, "bob").balance == 0
        assert get_account(conn, "fees").balance == 0
    books.check()


def test_an_entry_is_reversed_at_most_once(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    rev_id = books.created(Reverse("rev", "fund"))
    again = books.one(Reverse("rev", "fund"))
    assert (again.status, again.entry_id) == ("exists", rev_id)
    rejected(books.one(Reverse("rev-2", "fund")), "already_reversed")
    results = books.post(Reverse("rev-3", "fund"), Reverse("rev-4", "fund"))
    rejected(results[0], "already_reversed")
    rejected(results[1], "already_reversed")
    assert books.totals("alice") == (100, 100, 0, 0)
    # A reversal is itself an entry and can be reversed (the correction was wrong).
    books.created(Reverse("rev-of-rev", "rev"))
    assert books.totals("alice") == (100, 200, 0, 0)


def test_two_reversals_of_one_entry_in_one_batch(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    results = books.post(Reverse("rev-1", "fund"), Reverse("rev-2", "fund"))
    assert results[0].status == "created"
    rejected(results[1], "already_reversed")
    assert books.totals("alice") == (100, 100, 0, 0)


def test_holds_and_their_releases_cannot_be_reversed(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    rejected(books.one(Reverse("rev-hold", "hold")), "not_reversible")
    books.created(Resolve("void", "hold", "void"))
    rejected(books.one(Reverse("rev-void", "void")), "not_reversible")
    books.created(NewEntry("hold-2", (Leg("alice", "merchant", 50, pending=True),)))
    books.created(Resolve("post-2", "hold-2", "post", amount=20))
    # Posting a hold moved money: that part can be reversed like any posted transfer.
    books.created(Reverse("rev-post", "post-2"))
    assert books.totals("alice") == (20, 120, 0, 0)
    rejected(books.one(Reverse("rev-ghost", "never-booked")), "unknown_entry")
    books.check()


def test_a_reversal_is_refused_when_the_funds_are_already_spent(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("spend", (Leg("alice", "bob", 80),)))
    rejected(books.one(Reverse("claw-back", "fund")), "exceeds_credits")
    assert books.totals("alice") == (80, 100, 0, 0)
    books.created(Reverse("undo-spend", "spend"))
    books.created(Reverse("claw-back", "fund"))
    assert books.totals("alice") == (180, 180, 0, 0)
    books.check()


# --- accounts and assets ---------------------------------------------------------------


def test_closed_accounts_refuse_transfers(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    with books.engine.begin() as conn:
        set_closed(conn, "bob", True)
    before = books.counts()
    rejected(books.one(NewEntry("to-closed", (Leg("alice", "bob", 1),))), "account_closed")
    rejected(books.one(NewEntry("from-closed", (Leg("bob", "alice", 1),))), "account_closed")
    rejected(books.one(NewEntry("hold-closed", (Leg("alice", "bob", 1, pending=True),))), "account_closed")
    books.created(NewEntry("to-merchant", (Leg("alice", "merchant", 1),)))
    with books.engine.begin() as conn:
        set_closed(conn, "merchant", True)
    rejected(books.one(Reverse("rev", "to-merchant")), "account_closed")
    assert books.counts() == (before[0] + 1, before[1] + 1)
    with books.engine.begin() as conn:
        set_closed(conn, "bob", False)
    books.created(NewEntry("to-reopened", (Leg("alice", "bob", 1),)))
    books.check()


def test_an_account_with_open_holds_cannot_be_closed(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    books.created(NewEntry("hold", (Leg("alice", "merchant", 60, pending=True),)))
    with books.engine.begin() as conn, pytest.raises(Conflict) as info:
        set_closed(conn, "merchant", True)
    assert info.value.code == "open_holds"
    books.created(Resolve("void", "hold", "void"))
    with books.engine.begin() as conn:
        assert "closed" in set_closed(conn, "merchant", True).flags


def test_asset_mismatch_and_unknown_assets_and_accounts(books: Books) -> None:
    books.open("points:alice", "liability", asset="PTS")
    before = books.counts()
    rejected(books.one(NewEntry("mix", (Leg("bank", "points:alice", 1),))), "asset_mismatch")
    rejected(books.one(NewEntry("wrong", (Leg("bank", "alice", 1, asset="PTS"),))), "asset_mismatch")
    rejected(books.one(NewEntry("gold", (Leg("bank", "alice", 1, asset="GOLD"),))), "unknown_asset")
    rejected(books.one(NewEntry("ghost-d", (Leg("ghost", "alice", 1),))), "unknown_account")
    rejected(books.one(NewEntry("ghost-c", (Leg("bank", "ghost", 1),))), "unknown_account")
    assert books.counts() == before
    books.created(NewEntry("named", (Leg("bank", "alice", 1, asset="TRACE"),)))


def test_a_batch_above_the_engine_limit_is_refused_whole(books: Books) -> None:
    command = NewEntry("same", (Leg("bank", "alice", 1),))
    with books.engine.begin() as conn, pytest.raises(LedgerError) as info:
        post_batch(conn, [command] * (BATCH_MAX_COMMANDS + 1))
    assert info.value.code == "batch_too_large"
    assert books.counts() == (0, 0)


# --- history ---------------------------------------------------------------------------


def _posted_at(books: Books, key: str) -> datetime:
    value = books.scalar("SELECT posted_at FROM ledger_entries WHERE idempotency_key = :k", k=key)
    assert isinstance(value, datetime)
    return value


def test_balance_as_of_a_time_between_two_entries(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    time.sleep(0.02)
    books.created(NewEntry("spend", (Leg("alice", "bob", 30),)))
    first, second = _posted_at(books, "fund"), _posted_at(books, "spend")
    assert first < second
    between = first + (second - first) / 2
    with books.engine.connect() as conn:
        assert balance(conn, "alice", as_of=first - timedelta(microseconds=1))["balance"] == "0"
        at_between = balance(conn, "alice", as_of=between)
        assert (at_between["balance"], at_between["credits_posted"], at_between["debits_posted"]) == (
            "100",
            "100",
            "0",
        )
        assert at_between["as_of"] == between.isoformat()
        assert balance(conn, "alice", as_of=second)["balance"] == "70"
        assert balance(conn, "alice")["balance"] == "70"
        assert balance(conn, "bob", as_of=between)["balance"] == "0"


def test_balance_at_a_block_counts_only_chain_entries_up_to_it(books: Books) -> None:
    books.open("chain:1:0xcustody", "asset")
    for n, (block, amount) in enumerate([(10, 5), (20, 7), (20, 11)]):
        books.created(
            NewEntry(
                f"chain:1:{n}",
                (Leg("chain:1:0xcustody", "alice", amount),),
                chain=ChainRef(1, TX, n, block, BLOCK),
            )
        )
    books.created(NewEntry("off-chain", (Leg("chain:1:0xcustody", "alice", 1000),)))
    with books.engine.connect() as conn:
        assert balance(conn, "chain:1:0xcustody", at_block=9)["balance"] == "0"
        assert balance(conn, "chain:1:0xcustody", at_block=10)["balance"] == "5"
        at_15 = balance(conn, "chain:1:0xcustody", at_block=15)
        assert (at_15["balance"], at_15["at_block"]) == ("5", 15)
        assert balance(conn, "chain:1:0xcustody", at_block=20)["balance"] == "23"
        assert balance(conn, "alice", at_block=10**9)["balance"] == "23"
        assert balance(conn, "chain:1:0xcustody")["balance"] == "1023"


def test_a_reversal_with_a_chain_reference_counts_at_its_block(books: Books) -> None:
    # An orphaned deposit is compensated by a reversal carrying the orphaned event's reference:
    # at that block and after, the custody mirror no longer counts it. A reversal without a
    # reference is on no block, so a balance at a block still counts what it reversed.
    books.open("chain:1:0xvault", "asset")
    for n, (amount, block) in enumerate([(500, 10), (60, 11), (7, 12)]):
        books.created(
            NewEntry(
                f"chain:1:{n}",
                (Leg("chain:1:0xvault", "alice", amount),),
                chain=ChainRef(1, TX, n, block, BLOCK),
            )
        )
    books.created(Reverse("orphaned", "chain:1:0", chain=ChainRef(1, TX, 0, 10, BLOCK)))
    books.created(Reverse("corrected", "chain:1:1"))
    with books.engine.connect() as conn:
        assert balance(conn, "chain:1:0xvault", at_block=9)["balance"] == "0"
        assert balance(conn, "chain:1:0xvault", at_block=10)["balance"] == "0"
        assert balance(conn, "chain:1:0xvault", at_block=20)["balance"] == "67"
        assert balance(conn, "chain:1:0xvault")["balance"] == "7"
    books.check()


def test_a_statement_with_no_lines_before_its_end_opens_at_that_time(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    cut = _posted_at(books, "fund") + timedelta(microseconds=1)
    time.sleep(0.01)
    books.created(NewEntry("spend", (Leg("alice", "bob", 40),)))
    with books.engine.connect() as conn:
        after_fund = statement(conn, "alice", start=cut, end=cut + timedelta(microseconds=1))
        before_any = statement(conn, "alice", end=_posted_at(books, "fund"))
    assert (after_fund["lines"], after_fund["opening_balance"], after_fund["closing_balance"]) == (
        [],
        "100",
        "100",
    )
    assert (before_any["lines"], before_any["opening_balance"], before_any["closing_balance"]) == (
        [],
        "0",
        "0",
    )


def _book_history(books: Books) -> None:
    """17 transfers of alice: deposits, spends, incoming, holds posted, voided and open, a reversal."""
    books.deposit("fund-carol", "carol", 50)
    books.deposit("fund-1", "alice", 1000)
    for i in range(6):
        books.created(NewEntry(f"spend-{i}", (Leg("alice", "bob", 10 + i),)))
    books.created(NewEntry("in-0", (Leg("carol", "alice", 1),)))
    books.created(NewEntry("from-carol", (Leg("carol", "alice", 7), Leg("carol", "alice", 8))))
    books.created(NewEntry("hold-a", (Leg("alice", "merchant", 100, pending=True),)))
    books.created(NewEntry("hold-b", (Leg("alice", "merchant", 50, pending=True),)))
    books.created(Resolve("post-a", "hold-a", "post", amount=40))
    books.created(Resolve("void-b", "hold-b", "void"))
    books.created(NewEntry("hold-c", (Leg("alice", "fees", 5, pending=True),)))
    books.created(Reverse("rev-3", "spend-3"))
    books.deposit("fund-2", "alice", 3)


def test_statement_running_balances_and_pages_agree_with_the_balances(books: Books) -> None:
    _book_history(books)
    with books.engine.connect() as conn:
        full = statement(conn, "alice", limit=1000)
        account = get_account(conn, "alice")
        pages: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            page = statement(conn, "alice", after_id=after, limit=4)
            pages.append(page)
            after = page["next_after_id"]
            if after is None:
                break
    assert full["next_after_id"] is None
    assert full["opening_balance"] == "0"
    lines = full["lines"]
    assert len(lines) == 17
    assert [line for page in pages for line in page["lines"]] == lines
    assert len(pages) == 5
    for previous, page in itertools.pairwise(pages):
        assert page["opening_balance"] == previous["closing_balance"]

    # Recompute the running balances from the amounts alone (alice is a liability: credits grow it).
    posted, debits_pending, credits_pending = 0, 0, 0
    held: dict[str, int] = {}
    for line in lines:
        amount = int(line["amount"])
        sign = 1 if line["side"] == "credit" else -1
        if line["transfer_kind"] in ("posted", "post_pending"):
            posted += sign * amount
        if line["transfer_kind"] == "pending":
            held[line["entry_key"]] = amount
            debits_pending += amount if sign < 0 else 0
            credits_pending += amount if sign > 0 else 0
        elif line["transfer_kind"] in ("post_pending", "void_pending"):
            release = held.pop({"post-a": "hold-a", "void-b": "hold-b"}[line["entry_key"]])
            debits_pending -= release
        assert int(line["balance_after"]) == posted, line
        assert int(line["debits_pending_after"]) == debits_pending, line
        assert int(line["credits_pending_after"]) == credits_pending, line
    assert full["closing_balance"] == str(account.balance) == str(posted)
    assert (account.debits_pending, account.credits_pending) == (debits_pending, credits_pending)
    assert lines[0]["counterparty"] == "bank"
    assert {line["counterparty"] for line in lines} == {"bank", "bob", "carol", "merchant", "fees"}


def test_statement_within_a_time_window_opens_at_the_balance_before_it(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    time.sleep(0.01)
    books.created(NewEntry("spend-1", (Leg("alice", "bob", 10),)))
    books.created(NewEntry("spend-2", (Leg("alice", "bob", 20),)))
    time.sleep(0.01)
    books.created(NewEntry("spend-3", (Leg("alice", "bob", 40),)))
    start, end = _posted_at(books, "spend-1"), _posted_at(books, "spend-3")
    with books.engine.connect() as conn:
        window = statement(conn, "alice", start=start, end=end)
        empty = statement(conn, "alice", start=end + timedelta(seconds=1))
    assert [line["entry_key"] for line in window["lines"]] == ["spend-1", "spend-2"]
    assert (window["opening_balance"], window["closing_balance"]) == ("100", "70")
    assert (empty["lines"], empty["opening_balance"], empty["closing_balance"]) == ([], "30", "30")


# --- the whole ledger ------------------------------------------------------------------


def test_check_ledger_is_ok_on_a_busy_ledger(books: Books) -> None:
    books.open("points:issued", "equity")
    books.open("points:alice", "liability", ["debits_must_not_exceed_credits"], asset="PTS")
    books.open("points:pool", "equity", asset="PTS")
    _book_history(books)
    books.post(
        *[NewEntry(f"pts-{i}", (Leg("points:pool", "points:alice", i + 1),)) for i in range(50)],
        *[NewEntry(f"fee-{i}", (Leg("bob", "fees", 1),)) for i in range(50)],
        NewEntry("pts-hold", (Leg("points:alice", "points:pool", 1000, pending=True),)),
        NewEntry("pts-hold-2", (Leg("points:alice", "points:pool", 100, pending=True),)),
    )
    report = books.check()
    entries, transfers = books.counts()
    assert (report["entries"], report["transfers"]) == (entries, transfers)
    assert report["break_count"] == 0
    assert set(report["trial_balance"]) == {"PTS", "TRACE"}
    assert all(asset["balanced"] for asset in report["trial_balance"].values())
    assert report["trial_balance"]["PTS"]["credits_posted"] == str(sum(range(1, 51)))
    assert report["trial_balance"]["PTS"]["debits_pending"] == "1100"
    assert (report["open_holds"], report["open_holds_amount"]) == (3, "1105")


# --- audit -----------------------------------------------------------------------------


def test_entries_posted_for_an_actor_are_audited_and_rejections_are_not(books: Books) -> None:
    ops = Actor("ops@example.com", "finance", "req-1", "10.0.0.9")
    other = Actor("key:abc", "operator", "req-2")
    results = books.post(
        NewEntry("audited", (Leg("bank", "alice", 10),), kind="deposit"),
        NewEntry("refused", (Leg("alice", "bob", 11),)),
        NewEntry("system", (Leg("bank", "bob", 1),)),
        NewEntry("audited", (Leg("bank", "alice", 10),), kind="deposit"),
        actors=[ops, other, None, other],
    )
    assert [r.status for r in results] == ["created", "rejected", "created", "exists"]
    rows = books.rows(
        "SELECT actor, role, action, target, before, after, request_id, ip FROM audit_log ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (
            "ops@example.com",
            "finance",
            "entry.deposit",
            "entry:audited",
            None,
            {"key": "audited", "status": "created", "entry_id": results[0].entry_id},
            "req-1",
            "10.0.0.9",
        )
    ]
    queue = PostingQueue(books.poster, linger_ms=0)
    try:
        submitted = queue.submit([Reverse("undo", "audited")], actor=other)
    finally:
        queue.close()
    assert submitted[0].status == "created"
    assert books.rows("SELECT actor, action, target FROM audit_log WHERE request_id = 'req-2'") == [
        ("key:abc", "entry.reversal", "entry:undo")
    ]


# --- races the engine must absorb ------------------------------------------------------


def test_a_key_committed_while_the_batch_waited_for_its_locks_is_reported_as_exists(books: Books) -> None:
    command = NewEntry("race", (Leg("bank", "alice", 10),))
    outcome: dict[str, Any] = {}

    def late_submitter() -> None:
        try:
            outcome["results"] = books.poster.post([command])
        except Exception as exc:
            outcome["error"] = exc

    with books.engine.connect() as conn:
        transaction = conn.begin()
        first = post_batch(conn, [command])
        # The other batch reads the key (not there yet), then blocks on the account locks.
        thread = threading.Thread(target=late_submitter)
        thread.start()
        wait_for_lock_waiters(books.url, 1)
        transaction.commit()
    thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert [(r.status, r.entry_id) for r in outcome["results"]] == [("exists", first[0].entry_id)]


def test_an_account_updated_while_the_batch_waited_for_its_lock_is_still_found(books: Books) -> None:
    """The lock query re-reads rows that a batch it waited for has changed; it must not lose them
    (a busy account reported as unknown would refuse a valid entry)."""
    # Enough accounts, analysed, for the planner to look accounts up by index (the plan where
    # the re-check lost rows); a handful would be read by a sequential scan.
    with books.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ledger_accounts (code, asset_id, kind)"
                " SELECT 'filler:' || g, (SELECT id FROM ledger_assets WHERE code = 'TRACE'), 'liability'"
                " FROM generate_series(1, 5000) g"
            )
        )
    with psycopg.connect(books.url, autocommit=True) as owner:
        owner.execute("ANALYZE ledger_accounts")
    books.deposit("seed", "alice", 100)
    outcome: dict[str, Any] = {}

    def waiting_batch() -> None:
        try:
            outcome["results"] = books.poster.post(
                [NewEntry("after", (Leg("alice", "merchant", 30), Leg("bob", "fees", 1)))]
            )
        except Exception as exc:
            outcome["error"] = exc

    books.deposit("seed-bob", "bob", 5)
    with books.engine.connect() as conn:
        transaction = conn.begin()
        first = post_batch(conn, [NewEntry("first", (Leg("bank", "alice", 10), Leg("bank", "bob", 1)))])
        assert first[0].status == "created", first
        thread = threading.Thread(target=waiting_batch)
        thread.start()
        wait_for_lock_waiters(books.url, 1)
        transaction.commit()
    thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert [r.status for r in outcome["results"]] == ["created"], outcome["results"]
    assert books.totals("alice") == (30, 110, 0, 0)
    assert books.totals("bob") == (1, 6, 0, 0)
    books.check()


def test_a_command_postgresql_refuses_is_isolated_from_its_batch_mates(books: Books) -> None:
    # A rule only the database knows (as a later migration could add): the engine accepts the
    # command, PostgreSQL refuses the batch, and the Poster must find the one offender.
    with psycopg.connect(db.libpq_url(books.url), autocommit=True) as owner:
        owner.execute("ALTER TABLE ledger_entries ADD CONSTRAINT no_embargoed CHECK (kind <> 'embargoed')")
    results = books.post(
        NewEntry("good-1", (Leg("bank", "alice", 10),)),
        NewEntry("embargoed", (Leg("bank", "alice", 1),), kind="embargoed"),
        NewEntry("good-2", (Leg("bank", "bob", 5),)),
    )
    assert [(r.status, r.code) for r in results] == [
        ("created", None),
        ("rejected", "refused_by_database"),
        ("created", None),
    ]
    assert "no_embargoed" in (results[1].reason or "")
    assert books.totals("alice") == (0, 10, 0, 0)
    assert books.totals("bob") == (0, 5, 0, 0)
    assert books.rows("SELECT idempotency_key FROM ledger_entries ORDER BY id") == [("good-1",), ("good-2",)]
    books.check()


def test_check_ledger_sees_one_snapshot_while_holds_are_booked(books: Books) -> None:
    books.deposit("fund", "alice", 100)
    booked: list[EntryResult] = []

    def book_a_hold_in_between(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        # Another session commits a hold right before the check reads the pending totals.
        if not booked and "sum(debits_pending)" in sql and "ledger_transfers" not in sql:
            booked.extend(books.poster.post([NewEntry("hold", (Leg("alice", "merchant", 5, pending=True),))]))

    with books.engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", book_a_hold_in_between)
        report = check_ledger(conn)
    assert [r.status for r in booked] == ["created"]
    assert report["ok"], report["breaks"]
