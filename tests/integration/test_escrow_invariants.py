"""The escrow invariants, enforced by PostgreSQL itself: raw SQL that tries to break each one fails.

The attacks run as the application role (what a compromised or buggy process could do), a few
as the owner (what a careless migration could do). Each runs in a transaction of its own that
is rolled back, asserts the SQLSTATE and the constraint that refused it, and that the escrow
tables are exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from ledger import db
from ledger.commands import ChainRef
from ledger.escrow import attestation, disputes, party, service
from tests.conftest import APP_ROLE, Databases
from tests.rawsql import accepted, refused

UINT256_LIMIT = 2**256
CHAIN_ID = 31337
CONTRACT = "0x" + "e5" * 20
BUYER = "0x" + "b1" * 20
SELLER = "0x" + "5e" * 20
AMOUNT = 1_000
CHECK_VIOLATION = "23514"
UNIQUE_VIOLATION = "23505"
INSUFFICIENT_PRIVILEGE = "42501"
ESCROW_TABLES = (
    "escrow_attestors",
    "escrows",
    "escrow_policy",
    "escrow_attestations",
    "escrow_history",
    "escrow_disputes",
    "escrow_resolutions",
    "party_nonces",
)


@dataclass
class Books:
    """A database holding one funded, disputed escrow whose split awaits approval."""

    app: sa.Engine
    owner: sa.Engine
    escrow_id: str
    attestor_id: int
    dispute_id: int
    resolution_id: int

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every escrow table: what no refused attack may change."""
        with self.owner.connect() as conn:
            return {
                table: sorted(
                    (tuple(map(repr, row)) for row in conn.execute(sa.text(f"SELECT * FROM {table}"))),
                )
                for table in ESCROW_TABLES
            }


def _seed(url: str) -> Books:
    """Create, fund and dispute one escrow through the service, and decide a split of it that
    needs a second approval; one party nonce is spent."""
    _, pubkey, pop = attestation.generate_attestor(b"invariants".ljust(32, b"~"))
    deadline = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    with engine.begin() as conn:
        attestor_id, _ = service.register_attestor(conn, "carrier", pubkey, pop)
        escrow, _ = service.create_escrow(
            conn,
            service.NewEscrow(
                key="invariants-1",
                chain_id=CHAIN_ID,
                contract=CONTRACT,
                buyer=BUYER,
                seller=SELLER,
                amount=AMOUNT,
                fee_bps=250,
                deadline=deadline,
                delivery_ref="BOL-invariants-1",
                attestor_ids=(attestor_id,),
                threshold=1,
            ),
            "staff:test",
        )
        chain = ChainRef(CHAIN_ID, "0x" + "ab" * 32, 0, 10, "0x" + "cd" * 32)
        funding = service.Funding(chain, CONTRACT, escrow.id, BUYER, SELLER, AMOUNT, deadline)
        assert service.record_funding(conn, funding) == "funded"
        dispute, _ = disputes.open_dispute(conn, escrow.id, "buyer", "never arrived", "party:buyer")
        resolution, _ = disputes.decide_split(conn, escrow.id, 600, 390, 10, "apikey:finance1", 0)
        assert (resolution.status, resolution.needs_approval) == ("awaiting_approval", True)
        party.use_nonce(conn, BUYER, 7, "escrow.create", "0x" + "a" * 64, escrow.id)
    owner = db.make_engine(url, role=None, pool_size=1)
    return Books(engine, owner, escrow.id, attestor_id, dispute.id, resolution.id)


@pytest.fixture(scope="module")
def books(databases: Databases, template_db: str) -> Iterator[Books]:
    name = databases.create(template=template_db)
    seeded = _seed(databases.url(name))
    try:
        yield seeded
    finally:
        seeded.owner.dispose()
        seeded.app.dispose()
        databases.drop(name)


def _escrow_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "0x" + "e2" * 32,
        "chain_id": CHAIN_ID,
        "contract": CONTRACT,
        "buyer": BUYER,
        "seller": SELLER,
        "amount": AMOUNT,
        "fee_bps": 250,
        "deadline": datetime(2030, 1, 1, tzinfo=UTC),
        "delivery_ref": "BOL-raw",
        "threshold": 1,
        "status": "awaiting_funding",
        "funded_amount": 0,
        "released_amount": 0,
        "created_by": "raw",
    }
    row.update(changes)
    return row


_INSERT_ESCROW = (
    "INSERT INTO escrows (id, chain_id, contract, buyer, seller, amount, fee_bps, deadline, delivery_ref,"
    " threshold, status, funded_amount, released_amount, created_by) VALUES (:id, :chain_id, :contract,"
    " :buyer, :seller, :amount, :fee_bps, :deadline, :delivery_ref, :threshold, :status, :funded_amount,"
    " :released_amount, :created_by)"
)


def _resolution_row(books: Books, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "escrow_id": books.escrow_id,
        "dispute_id": books.dispute_id,
        "seller_amount": 500,
        "buyer_amount": 500,
        "fee": 0,
        "decided_by": "apikey:finance2",
        "needs_approval": True,
        "approved_by": None,
        "status": "awaiting_approval",
    }
    row.update(changes)
    return row


_INSERT_RESOLUTION = (
    "INSERT INTO escrow_resolutions (escrow_id, dispute_id, seller_amount, buyer_amount, fee, decided_by,"
    " needs_approval, approved_by, status) VALUES (:escrow_id, :dispute_id, :seller_amount, :buyer_amount,"
    " :fee, :decided_by, :needs_approval, :approved_by, :status)"
)


# --- the controls: well-formed raw writes by the application role go through ----------------


def test_well_formed_raw_writes_by_the_app_role_are_accepted(books: Books) -> None:
    """The refusals below are for the reason named, not a broken setup or missing grants."""
    before = books.state()
    assert accepted(books.app, _INSERT_ESCROW, _escrow_row()) == 1
    assert accepted(books.app, "UPDATE escrows SET released_amount = 600, fee_amount = 10") == 1
    assert accepted(books.app, "UPDATE escrows SET status = 'resolving', updated_at = now()") == 1
    # A withdrawn split frees the escrow for another live one.
    withdrawn = "UPDATE escrow_resolutions SET status = 'withdrawn'"
    with books.app.connect() as conn:
        conn.begin()
        conn.execute(sa.text(withdrawn))
        assert conn.execute(sa.text(_INSERT_RESOLUTION), _resolution_row(books)).rowcount == 1
        conn.rollback()
    approve = "UPDATE escrow_resolutions SET status = 'executing', approved_by = 'apikey:finance2'"
    assert accepted(books.app, approve) == 1
    assert accepted(books.app, "UPDATE escrow_disputes SET closed_at = now()") == 1
    nonce = "INSERT INTO party_nonces (address, nonce, action, digest, target) VALUES (:a, '8', 'x', :d, 't')"
    assert accepted(books.app, nonce, {"a": BUYER, "d": "0x" + "b" * 64}) == 1
    assert books.state() == before


# --- escrows: amounts, status, parties, paid within funded -----------------------------------


@pytest.mark.parametrize(
    ("changes", "constraint"),
    [
        ({"amount": 0}, "escrows_amount_check"),
        ({"amount": -1}, "escrows_amount_check"),
        ({"amount": UINT256_LIMIT}, "escrows_amount_check"),
        ({"status": "stolen"}, "escrows_status_check"),
        ({"status": "RELEASED"}, "escrows_status_check"),
        ({"seller": BUYER}, "buyer_is_not_seller"),
        ({"funded_amount": 0, "released_amount": 1}, "paid_within_funded"),
        ({"fee_bps": 10_001}, "escrows_fee_bps_check"),
        ({"threshold": 0}, "escrows_threshold_check"),
        ({"buyer": BUYER.upper().replace("0X", "0x")}, "escrows_buyer_check"),
        ({"id": "0x" + "e2" * 31}, "escrows_id_check"),
    ],
)
def test_an_escrow_row_outside_the_invariants_is_refused(
    books: Books, changes: dict[str, Any], constraint: str
) -> None:
    before = books.state()
    error = refused(books.app, _INSERT_ESCROW, _escrow_row(**changes))
    assert (error.sqlstate, error.diag.constraint_name) == (CHECK_VIOLATION, constraint)
    assert books.state() == before


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        ("UPDATE escrows SET released_amount = funded_amount + 1", "paid_within_funded"),
        ("UPDATE escrows SET released_amount = funded_amount, fee_amount = 1", "paid_within_funded"),
        ("UPDATE escrows SET refunded_amount = 600, released_amount = 401", "paid_within_funded"),
        ("UPDATE escrows SET funded_amount = 0, refunded_amount = 1", "paid_within_funded"),
        ("UPDATE escrows SET released_amount = -1", "escrows_released_amount_check"),
        ("UPDATE escrows SET status = 'stolen'", "escrows_status_check"),
        ("UPDATE escrows SET status = NULL", None),
        ("UPDATE escrows SET release_proof = decode(repeat('00', 96), 'hex')", "proof_whole"),
    ],
)
def test_an_update_breaking_an_escrow_invariant_is_refused(
    books: Books, sql: str, constraint: str | None
) -> None:
    before = books.state()
    error = refused(books.app, sql)
    if constraint is None:
        assert error.sqlstate == "23502"  # not_null_violation
    else:
        assert (error.sqlstate, error.diag.constraint_name) == (CHECK_VIOLATION, constraint)
    assert books.state() == before


# --- resolutions: four eyes, approval before execution, one live split -----------------------


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        (
            "UPDATE escrow_resolutions SET approved_by = decided_by, approved_at = now(),"
            " status = 'executing'",
            "four_eyes",
        ),
        ("UPDATE escrow_resolutions SET approved_by = decided_by", "four_eyes"),
        ("UPDATE escrow_resolutions SET status = 'executing'", "approved_before_executed"),
        ("UPDATE escrow_resolutions SET status = 'executed'", "approved_before_executed"),
        ("UPDATE escrow_resolutions SET status = 'failed'", "approved_before_executed"),
        (
            "UPDATE escrow_resolutions SET status = 'approved', approved_by = 'apikey:finance2'",
            "escrow_resolutions_status_check",
        ),
    ],
)
def test_a_split_is_never_carried_out_without_a_second_person(
    books: Books, sql: str, constraint: str
) -> None:
    before = books.state()
    error = refused(books.app, sql)
    assert (error.sqlstate, error.diag.constraint_name) == (CHECK_VIOLATION, constraint)
    assert books.state() == before


@pytest.mark.parametrize(
    ("changes", "constraint"),
    [
        (
            {"approved_by": "apikey:finance2", "status": "withdrawn"},
            "four_eyes",
        ),
        ({"status": "executing"}, "approved_before_executed"),
        ({"seller_amount": 0, "buyer_amount": 0, "status": "withdrawn"}, "splits_something"),
        ({"seller_amount": -1, "status": "withdrawn"}, "escrow_resolutions_seller_amount_check"),
        ({"fee": -1, "status": "withdrawn"}, "escrow_resolutions_fee_check"),
    ],
)
def test_a_raw_resolution_outside_the_invariants_is_refused(
    books: Books, changes: dict[str, Any], constraint: str
) -> None:
    before = books.state()
    error = refused(books.app, _INSERT_RESOLUTION, _resolution_row(books, **changes))
    assert (error.sqlstate, error.diag.constraint_name) == (CHECK_VIOLATION, constraint)
    assert books.state() == before


@pytest.mark.parametrize("status", ["awaiting_approval", "executing"])
def test_an_escrow_has_at_most_one_live_resolution(books: Books, status: str) -> None:
    before = books.state()
    row = _resolution_row(books, status=status, needs_approval=False)
    error = refused(books.app, _INSERT_RESOLUTION, row)
    assert (error.sqlstate, error.diag.constraint_name) == (UNIQUE_VIOLATION, "escrow_resolutions_live")
    # Bringing a withdrawn one back to life collides the same way.
    revive = "UPDATE escrow_resolutions SET status = 'awaiting_approval' WHERE status = 'withdrawn'"
    withdrawn = _resolution_row(books, status="withdrawn")
    with books.app.connect() as conn:
        conn.begin()
        conn.execute(sa.text(_INSERT_RESOLUTION), withdrawn)
        with pytest.raises(sa.exc.IntegrityError) as info:
            conn.execute(sa.text(revive))
        conn.rollback()
    assert isinstance(info.value.orig, psycopg.Error)
    assert info.value.orig.diag.constraint_name == "escrow_resolutions_live"
    assert books.state() == before


# --- disputes and nonces -------------------------------------------------------------------


def test_an_escrow_has_at_most_one_open_dispute(books: Books) -> None:
    before = books.state()
    insert = (
        "INSERT INTO escrow_disputes (escrow_id, party, opened_by, reason, closed_at)"
        " VALUES (:e, 'seller', 'party:seller', 'me too', :closed)"
    )
    error = refused(books.app, insert, {"e": books.escrow_id, "closed": None})
    assert (error.sqlstate, error.diag.constraint_name) == (UNIQUE_VIOLATION, "escrow_disputes_open")
    # A closed one alongside is fine; reopening it collides.
    reopen = "UPDATE escrow_disputes SET closed_at = NULL WHERE closed_at IS NOT NULL"
    with books.app.connect() as conn:
        conn.begin()
        conn.execute(sa.text(insert), {"e": books.escrow_id, "closed": datetime.now(UTC)})
        with pytest.raises(sa.exc.IntegrityError) as info:
            conn.execute(sa.text(reopen))
        conn.rollback()
    assert isinstance(info.value.orig, psycopg.Error)
    assert info.value.orig.diag.constraint_name == "escrow_disputes_open"
    assert books.state() == before


@pytest.mark.parametrize(
    ("changes", "sqlstate", "constraint"),
    [
        ({"party": "arbiter"}, CHECK_VIOLATION, "escrow_disputes_party_check"),
        ({"reason": ""}, CHECK_VIOLATION, "escrow_disputes_reason_check"),
        ({"reason": "x" * 1001}, CHECK_VIOLATION, "escrow_disputes_reason_check"),
        ({"escrow_id": "0x" + "00" * 32}, "23503", "escrow_disputes_escrow_id_fkey"),
    ],
)
def test_a_raw_dispute_outside_the_invariants_is_refused(
    books: Books, changes: dict[str, Any], sqlstate: str, constraint: str
) -> None:
    before = books.state()
    row = {"escrow_id": books.escrow_id, "party": "seller", "reason": "late", **changes}
    insert = (
        "INSERT INTO escrow_disputes (escrow_id, party, opened_by, reason, closed_at)"
        " VALUES (:escrow_id, :party, 'raw', :reason, now())"
    )
    error = refused(books.app, insert, row)
    assert (error.sqlstate, error.diag.constraint_name) == (sqlstate, constraint)
    assert books.state() == before


def test_a_party_nonce_is_used_once(books: Books) -> None:
    before = books.state()
    insert = (
        "INSERT INTO party_nonces (address, nonce, action, digest, target)"
        " VALUES (:a, '7', 'escrow.dispute', :d, 'elsewhere')"
    )
    error = refused(books.app, insert, {"a": BUYER, "d": "0x" + "c" * 64})
    assert (error.sqlstate, error.diag.constraint_name) == (UNIQUE_VIOLATION, "party_nonces_pkey")
    # Malformed rows are refused too: an address or digest not in canonical form.
    bad_address = refused(books.app, insert.replace("'7'", "'8'"), {"a": BUYER.upper(), "d": "0x" + "c" * 64})
    assert (bad_address.sqlstate, bad_address.diag.constraint_name) == (
        CHECK_VIOLATION,
        "party_nonces_address_check",
    )
    bad_digest = refused(books.app, insert.replace("'7'", "'8'"), {"a": BUYER, "d": "c" * 64})
    assert (bad_digest.sqlstate, bad_digest.diag.constraint_name) == (
        CHECK_VIOLATION,
        "party_nonces_digest_check",
    )
    assert books.state() == before


# --- history is append-only; the app role may not delete or rewrite terms ------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE escrow_history SET to_status = 'released'",
        "UPDATE escrow_history SET actor = 'someone else'",
        "DELETE FROM escrow_history",
        "TRUNCATE escrow_history",
    ],
)
def test_the_app_role_cannot_rewrite_escrow_history(books: Books, sql: str) -> None:
    before = books.state()
    error = refused(books.app, sql)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE
    assert "permission denied" in str(error)
    assert books.state() == before


@pytest.mark.parametrize(
    "sql", ["UPDATE escrow_history SET to_status = 'released'", "DELETE FROM escrow_history"]
)
def test_the_owner_is_stopped_by_the_escrow_history_trigger(books: Books, sql: str) -> None:
    before = books.state()
    error = refused(books.owner, sql)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE
    assert "append-only" in str(error)
    assert books.state() == before


def test_the_owner_cannot_truncate_escrow_history(books: Books) -> None:
    before = books.state()
    error = refused(books.owner, "TRUNCATE escrow_history CASCADE")
    assert "append-only" in str(error)
    assert books.state() == before


_FORBIDDEN = [
    # Nothing escrow-related is ever deleted by the application.
    "DELETE FROM escrows",
    "DELETE FROM escrow_disputes",
    "DELETE FROM escrow_resolutions",
    "DELETE FROM party_nonces",
    "DELETE FROM escrow_policy",
    "DELETE FROM escrow_attestations",
    "DELETE FROM escrow_attestors",
    "TRUNCATE escrows CASCADE",
    "TRUNCATE escrow_disputes CASCADE",
    "TRUNCATE escrow_resolutions",
    "TRUNCATE party_nonces",
    # The agreed terms of an escrow never change.
    "UPDATE escrows SET amount = amount + 1",
    "UPDATE escrows SET buyer = '0x" + "ba" * 20 + "'",
    "UPDATE escrows SET seller = '0x" + "ba" * 20 + "'",
    "UPDATE escrows SET fee_bps = 0",
    "UPDATE escrows SET contract = '0x" + "ba" * 20 + "'",
    "UPDATE escrows SET chain_id = 1",
    "UPDATE escrows SET delivery_ref = 'other'",
    "UPDATE escrows SET threshold = 1",
    "UPDATE escrows SET auto_release = false",
    "UPDATE escrows SET created_by = 'someone else'",
    "UPDATE escrows SET id = '0x" + "ba" * 32 + "'",
    # Nor does a decided split, an opened dispute, a spent nonce or a policy.
    "UPDATE escrow_resolutions SET seller_amount = seller_amount + 1",
    "UPDATE escrow_resolutions SET buyer_amount = 0",
    "UPDATE escrow_resolutions SET fee = 0",
    "UPDATE escrow_resolutions SET decided_by = 'apikey:someone'",
    "UPDATE escrow_resolutions SET needs_approval = false",
    "UPDATE escrow_disputes SET reason = 'something else'",
    "UPDATE escrow_disputes SET party = 'staff'",
    "UPDATE escrow_disputes SET opened_by = 'someone else'",
    "UPDATE party_nonces SET digest = '0x" + "d" * 64 + "'",
    "UPDATE party_nonces SET target = 'elsewhere'",
    "UPDATE party_nonces SET nonce = '8'",
    "UPDATE escrow_policy SET attestor_id = attestor_id + 1",
    "UPDATE escrow_attestations SET signature = signature",
    "UPDATE escrow_attestors SET pubkey = pubkey",
    "UPDATE escrow_attestors SET name = 'someone else'",
]


@pytest.mark.parametrize("sql", _FORBIDDEN)
def test_the_app_role_may_not_delete_or_rewrite_terms(books: Books, sql: str) -> None:
    before = books.state()
    error = refused(books.app, sql)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE
    assert "permission denied" in str(error)
    assert books.state() == before
