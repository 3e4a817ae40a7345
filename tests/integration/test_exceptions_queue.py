"""Working the exceptions queue on a real PostgreSQL: assign, notes, manual match, write-offs with
four eyes; every step audited; bad input and out-of-turn moves refused with nothing written; the
queue's rules hold against raw SQL too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from ledger import db
from ledger.accounts import create_account, create_asset, get_account
from ledger.audit import Actor
from ledger.commands import Leg, NewEntry
from ledger.engine import post_batch
from ledger.errors import Conflict, InvalidInput, LedgerError, NotFound
from ledger.exceptions_queue import (
    add_note,
    assign,
    decide_writeoff,
    get_exception,
    list_exceptions,
    open_exception,
    propose_writeoff,
    resolve_match,
)
from tests.conftest import APP_ROLE, Databases
from tests.rawsql import accepted, refused

ALICE = Actor("apikey:alice", "finance", "req-1")
BOB = Actor("apikey:bob", "finance", "req-2")
CAROL = Actor("apikey:carol", "admin", "req-3")


@dataclass
class Queue:
    engine: sa.Engine
    owner: sa.Engine

    def state(self) -> dict[str, Any]:
        with self.owner.connect() as conn:
            return {
                table: conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1")).all()
                for table in (
                    "finance_exceptions",
                    "finance_exception_notes",
                    "finance_writeoffs",
                    "ledger_entries",
                )
            }

    def balance(self, code: str) -> int:
        with self.engine.connect() as conn:
            return get_account(conn, code).balance

    def audit(self) -> list[tuple[str, str]]:
        with self.owner.connect() as conn:
            return [
                (r.action, r.actor)
                for r in conn.execute(sa.text("SELECT action, actor FROM audit_log ORDER BY id"))
            ]


@pytest.fixture
def q(databases: Databases, template_db: str) -> Iterator[Queue]:
    name = databases.create(template=template_db)
    url = databases.url(name)
    engine = db.make_engine(url, role=APP_ROLE, pool_size=2)
    owner = db.make_engine(url, role=None, pool_size=1)
    with engine.begin() as conn:
        create_asset(conn, "TRACE", 18)
        create_asset(conn, "PTS", 0)
        create_account(conn, "suspense:chain:1", "TRACE", "liability")
        create_account(conn, "chain:1:custody", "TRACE", "asset")
        create_account(conn, "revenue:unclaimed", "TRACE", "revenue")
        create_account(conn, "points:issued", "PTS", "equity")
        (result,) = post_batch(conn, [NewEntry("in", (Leg("chain:1:custody", "suspense:chain:1", 500),))])
        assert result.status == "created"
        open_exception(conn, "unexplained:1", "unexplained_transfer", {"amount": "500"})
        open_exception(conn, "unexplained:2", "unexplained_transfer", {"amount": "7"})
    yield Queue(engine, owner)
    engine.dispose()
    owner.dispose()
    databases.drop(name)


def _do(q: Queue, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with q.engine.begin() as conn:
        return fn(conn, *args, **kwargs)


def _refused_unchanged(
    q: Queue, error: type[LedgerError], code: str | None, fn: Any, *args: Any, **kwargs: Any
) -> LedgerError:
    """``fn`` raises ``error`` (of ``code``, when given) and nothing is written; returns the error."""
    before = q.state()
    with pytest.raises(error) as caught:
        _do(q, fn, *args, **kwargs)
    if code is not None:
        assert caught.value.code == code
    assert q.state() == before
    return caught.value


def test_assign_note_and_match(q: Queue) -> None:
    assigned = _do(q, assign, 1, "bob", ALICE)
    assert assigned["assignee"] == "bob"
    noted = _do(q, add_note, 1, "the buyer sent it twice; refund agreed", BOB)
    assert [n["author"] for n in noted["notes"]] == ["apikey:bob"]
    resolved = _do(q, resolve_match, 1, "booked against escrow 42 by hand; chain and books agree", BOB)
    assert (resolved["status"], resolved["resolution"], resolved["resolved_by"]) == (
        "resolved",
        "manual_match",
        "apikey:bob",
    )
    with q.engine.connect() as conn:
        assert [e["id"] for e in list_exceptions(conn, status="open")] == [2]
        assert [e["id"] for e in list_exceptions(conn, assignee="bob")] == [1]
        assert [e["id"] for e in list_exceptions(conn, after=1)] == [2]
    # Notes may still be added; nothing else changes once resolved.
    assert len(_do(q, add_note, 1, "closing remark", ALICE)["notes"]) == 2
    _refused_unchanged(q, Conflict, "exception_resolved", assign, 1, "carol", ALICE)
    _refused_unchanged(q, Conflict, "exception_resolved", resolve_match, 1, "again", ALICE)
    assert q.audit() == [
        ("exception.assign", "apikey:alice"),
        ("exception.note", "apikey:bob"),
        ("exception.match", "apikey:bob"),
        ("exception.note", "apikey:alice"),
    ]


def test_a_write_off_needs_a_second_person_and_books_its_entry(q: Queue) -> None:
    proposal = _do(
        q,
        propose_writeoff,
        1,
        debit="suspense:chain:1",
        credit="revenue:unclaimed",
        amount=500,
        reason="unclaimed for 90 days",
        actor=ALICE,
    )
    assert proposal["status"] == "proposed"
    assert q.balance("suspense:chain:1") == 500  # nothing booked yet
    _refused_unchanged(q, Conflict, "four_eyes", decide_writeoff, proposal["id"], approve=True, actor=ALICE)
    _refused_unchanged(q, Conflict, "writeoff_pending", resolve_match, 1, "meanwhile", BOB)
    _refused_unchanged(
        q,
        Conflict,
        "writeoff_pending",
        propose_writeoff,
        1,
        debit="suspense:chain:1",
        credit="revenue:unclaimed",
        amount=1,
        reason="second",
        actor=BOB,
    )
    approved = _do(q, decide_writeoff, proposal["id"], approve=True, actor=BOB)
    assert (approved["status"], approved["decided_by"], approved["entry_key"]) == (
        "approved",
        "apikey:bob",
        f"writeoff:{proposal['id']}",
    )
    assert q.balance("suspense:chain:1") == 0
    assert q.balance("revenue:unclaimed") == 500
    with q.engine.connect() as conn:
        exception = get_exception(conn, 1)
    assert (exception["status"], exception["resolution"], exception["resolution_entry_key"]) == (
        "resolved",
        "write_off",
        approved["entry_key"],
    )
    # Deciding again the same way is a retry; anything else is refused.
    assert _do(q, decide_writeoff, proposal["id"], approve=True, actor=BOB) == approved
    _refused_unchanged(
        q, Conflict, "writeoff_decided", decide_writeoff, proposal["id"], approve=False, actor=CAROL
    )
    assert [a for a, _ in q.audit()] == ["writeoff.propose", "writeoff.approve"]


def test_a_rejected_write_off_leaves_the_exception_open(q: Queue) -> None:
    proposal = _do(
        q,
        propose_writeoff,
        2,
        debit="suspense:chain:1",
        credit="revenue:unclaimed",
        amount=7,
        reason="dust",
        actor=ALICE,
    )
    rejected = _do(q, decide_writeoff, proposal["id"], approve=False, actor=CAROL)
    assert (rejected["status"], rejected["entry_key"]) == ("rejected", None)
    with q.engine.connect() as conn:
        assert get_exception(conn, 2)["status"] == "open"
    again = _do(
        q,
        propose_writeoff,
        2,
        debit="suspense:chain:1",
        credit="revenue:unclaimed",
        amount=7,
        reason="dust, second try",
        actor=BOB,
    )
    assert again["id"] != proposal["id"]


def test_a_write_off_the_ledger_refuses_changes_nothing(q: Queue) -> None:
    with q.engine.begin() as conn:
        create_account(conn, "user:limited", "TRACE", "liability", flags=["debits_must_not_exceed_credits"])
    proposal = _do(
        q,
        propose_writeoff,
        1,
        debit="user:limited",
        credit="revenue:unclaimed",
        amount=10,
        reason="overdraws a limited account",
        actor=ALICE,
    )
    refusal = _refused_unchanged(
        q, LedgerError, None, decide_writeoff, proposal["id"], approve=True, actor=BOB
    )
    # The ledger's own reason, naming the account it would overdraw.
    assert "write-off entry was refused" in refusal.message
    assert "user:limited" in refusal.message
    assert _do(q, get_exception, 1)["status"] == "open"


@pytest.mark.parametrize(
    ("kwargs", "error", "code", "named"),
    [
        (
            {"debit": "nope", "credit": "revenue:unclaimed", "amount": 1},
            NotFound,
            "unknown_account",
            "'nope'",
        ),
        (
            {"debit": "suspense:chain:1", "credit": "suspense:chain:1", "amount": 1},
            InvalidInput,
            "invalid_input",
            "two different accounts",
        ),
        (
            {"debit": "suspense:chain:1", "credit": "points:issued", "amount": 1},
            LedgerError,
            "asset_mismatch",
            "points:issued holds PTS",
        ),
        (
            {"debit": "suspense:chain:1", "credit": "revenue:unclaimed", "amount": 0},
            InvalidInput,
            "invalid_input",
            "greater than zero",
        ),
        (
            {"debit": "suspense:chain:1", "credit": "revenue:unclaimed", "amount": -5},
            InvalidInput,
            "invalid_input",
            "greater than zero",
        ),
        (
            {"debit": "suspense:chain:1", "credit": "revenue:unclaimed", "amount": 2**256},
            InvalidInput,
            "invalid_input",
            "below 2^256",
        ),
        (
            {"debit": "bad code!", "credit": "revenue:unclaimed", "amount": 1},
            InvalidInput,
            "invalid_input",
            "account code",
        ),
    ],
)
def test_bad_write_offs_are_refused(
    q: Queue, kwargs: dict[str, Any], error: type[LedgerError], code: str, named: str
) -> None:
    refusal = _refused_unchanged(q, error, code, propose_writeoff, 1, reason="r", actor=ALICE, **kwargs)
    assert named in refusal.message


@pytest.mark.parametrize(
    ("fn", "args", "error", "code", "named"),
    [
        (assign, (999, "bob", ALICE), NotFound, "unknown_exception", "no exception 999"),
        (assign, (1, "", ALICE), InvalidInput, "invalid_input", "assignee"),
        (assign, (0, "bob", ALICE), InvalidInput, "invalid_input", "exception id"),
        (add_note, (1, "   ", ALICE), InvalidInput, "invalid_input", "note"),
        (add_note, (1, "x" * 4001, ALICE), InvalidInput, "invalid_input", "note must be 1 to 4000"),
        (resolve_match, (999, "why", ALICE), NotFound, "unknown_exception", "no exception 999"),
    ],
)
def test_bad_requests_are_refused(
    q: Queue, fn: Any, args: tuple[Any, ...], error: type[LedgerError], code: str, named: str
) -> None:
    refusal = _refused_unchanged(q, error, code, fn, *args)
    assert named in refusal.message


def test_deciding_an_unknown_write_off_is_refused(q: Queue) -> None:
    refusal = _refused_unchanged(
        q, NotFound, "unknown_writeoff", decide_writeoff, 12345, approve=True, actor=BOB
    )
    assert "12345" in refusal.message


# -- the rules in PostgreSQL itself -----------------------------------------------------------


def _proposed(q: Queue) -> int:
    return int(
        _do(
            q,
            propose_writeoff,
            1,
            debit="suspense:chain:1",
            credit="revenue:unclaimed",
            amount=5,
            reason="r",
            actor=ALICE,
        )["id"]
    )


def test_raw_sql_cannot_approve_one_s_own_write_off(q: Queue) -> None:
    wid = _proposed(q)
    error = refused(
        q.engine,
        "UPDATE finance_writeoffs SET status = 'rejected', decided_by = proposed_by, decided_at = now()"
        " WHERE id = :id",
        {"id": wid},
    )
    assert error.diag.constraint_name == "four_eyes"


def test_raw_sql_cannot_approve_without_the_entry_or_resolve_as_write_off_without_approval(q: Queue) -> None:
    wid = _proposed(q)
    error = refused(
        q.engine,
        "UPDATE finance_writeoffs SET status = 'approved', decided_by = 'x', decided_at = now(),"
        " entry_key = 'writeoff:none' WHERE id = :id",
        {"id": wid},
    )
    assert "without its ledger entry" in str(error)
    error = refused(
        q.engine,
        "UPDATE finance_exceptions SET status = 'resolved', resolution = 'write_off', resolved_by = 'x',"
        " resolved_at = now(), resolution_note = 'n', resolution_entry_key = 'in' WHERE id = 1",
    )
    assert "needs its approved write-off" in str(error)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE finance_exceptions SET status = 'resolved' WHERE id = 2",
        "UPDATE finance_exceptions SET resolution = 'manual_match' WHERE id = 2",
        "INSERT INTO finance_writeoffs (exception_id, debit, credit, asset, amount, reason, proposed_by)"
        " VALUES (2, 'a', 'a', 'TRACE', 1, 'r', 'x')",
        "INSERT INTO finance_writeoffs (exception_id, debit, credit, asset, amount, reason, proposed_by)"
        " VALUES (2, 'a', 'b', 'TRACE', 0, 'r', 'x')",
        "INSERT INTO finance_writeoffs (exception_id, debit, credit, asset, amount, reason, proposed_by,"
        " status) VALUES (2, 'a', 'b', 'TRACE', 1, 'r', 'x', 'approved')",
    ],
)
def test_raw_rows_outside_the_rules_are_refused(q: Queue, sql: str) -> None:
    assert isinstance(refused(q.engine, sql), psycopg.errors.CheckViolation)


def test_decided_and_resolved_rows_are_frozen_and_nothing_is_deleted(q: Queue) -> None:
    _do(q, resolve_match, 2, "agreed", ALICE)
    _do(q, add_note, 2, "kept", ALICE)
    wid = _proposed(q)
    _do(q, decide_writeoff, wid, approve=False, actor=BOB)
    for engine in (q.engine, q.owner):
        assert "is resolved" in str(
            refused(engine, "UPDATE finance_exceptions SET assignee = 'x' WHERE id = 2")
        )
        assert "cannot change" in str(
            refused(engine, "UPDATE finance_writeoffs SET decided_at = now() WHERE id = :id", {"id": wid})
        )
    for sql in (
        "DELETE FROM finance_exceptions",
        "DELETE FROM finance_exception_notes",
        "DELETE FROM finance_writeoffs",
        "UPDATE finance_exception_notes SET note = 'edited'",
        "TRUNCATE finance_exception_notes",
        "TRUNCATE finance_writeoffs",
        "TRUNCATE finance_exceptions CASCADE",
    ):
        refused(q.owner, sql)
        refused(q.engine, sql)
    # The app role may not rewrite what was proposed (no privilege), even while it is open.
    open_id = int(
        _do(
            q,
            propose_writeoff,
            1,
            debit="suspense:chain:1",
            credit="revenue:unclaimed",
            amount=5,
            reason="r",
            actor=ALICE,
        )["id"]
    )
    error = refused(q.engine, "UPDATE finance_writeoffs SET amount = 1 WHERE id = :id", {"id": open_id})
    assert isinstance(error, psycopg.errors.InsufficientPrivilege)
    assert accepted(q.engine, "UPDATE finance_exceptions SET assignee = 'dave' WHERE id = 1") == 1
