"""The points invariants, enforced by PostgreSQL itself: raw SQL that tries to break each one fails.

The attacks run as the application role (a compromised or buggy process), a few as the owner (a
careless migration). Each runs in a transaction of its own that is rolled back, checks the
SQLSTATE and the constraint or trigger that refused it, and that the points tables are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from ledger import db
from ledger.points import claims, ingest
from tests import rawsql
from tests.conftest import APP_ROLE, Databases
from tests.points_kit import make_world
from tests.rawsql import accepted

CHECK_VIOLATION = "23514"
INSUFFICIENT_PRIVILEGE = "42501"
WALLET = "0x" + "a1" * 20
CHAIN = claims.Chain(31337, "0x" + "70" * 20, "0x" + "51" * 20)
TABLES = (
    "points_participants",
    "points_rules",
    "points_events",
    "points_daily_totals",
    "points_lots",
    "points_expiries",
    "points_claims",
    "points_claim_lots",
)


@dataclass
class Books:
    app: sa.Engine
    owner: sa.Engine
    participant: str
    event_type: str
    rule_id: int
    lot_id: int
    claim_id: int

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        with self.owner.connect() as conn:
            return {
                t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES
            }


@pytest.fixture(scope="module")
def books(databases: Databases, template_db: str) -> Iterator[Books]:
    name = databases.create(template=template_db)
    url = databases.url(name)
    app = db.make_engine(url, role=APP_ROLE, pool_size=2)
    owner = db.make_engine(url, role=None, pool_size=1)
    world = make_world(app, "inv", wallet=WALLET)
    with app.begin() as conn:
        ingest.ingest(conn, [world.event(f"e{i}", world.alice, world.on_time) for i in range(2)])
    with app.begin() as conn:
        claim, _ = claims.create_claim(conn, CHAIN, world.alice, 4, "claim-1", Decimal(2), "tests")
        rule_id = conn.execute(
            sa.text("SELECT id FROM points_rules WHERE event_type = :t"), {"t": world.on_time}
        ).scalar_one()
        lot_id = conn.execute(sa.text("SELECT min(id) FROM points_lots")).scalar_one()
    try:
        yield Books(app, owner, world.alice, world.on_time, rule_id, lot_id, claim.id)
    finally:
        app.dispose()
        owner.dispose()
        databases.drop(name)


def refused(engine: sa.Engine, sql: str, params: dict[str, Any] | None = None) -> psycopg.Error:
    """``sql`` fails (at the statement or at commit); nothing stays either way."""
    return rawsql.refused(engine, sql, params, at_commit=True)


_EVENT = (
    "INSERT INTO points_events (source, event_id, participant_id, event_type, occurred_at, content_hash,"
    " batch_id, rule_id, tier, base_points, multiplier_bps, earned, points, capped)"
    " VALUES ('raw', :eid, :p, :t, :occ, :hash, 999, :rule, 'gold', 7, 10000, :earned, :points, :capped)"
)


def _event(books: Books, **changes: Any) -> dict[str, Any]:
    row = {"eid": "raw-1", "p": books.participant, "t": books.event_type, "occ": "2026-01-01T00:00:00Z"}
    scoring = {"hash": b"\x01" * 32, "rule": books.rule_id, "earned": 7, "points": 7, "capped": False}
    return {**row, **scoring, **changes}


def test_well_formed_raw_writes_by_the_app_role_are_accepted(books: Books) -> None:
    """The refusals below are for the reason named, not a missing grant or a broken setup."""
    before = books.state()
    assert accepted(books.app, _EVENT, _event(books)) == 1
    assert (
        accepted(
            books.app, "UPDATE points_lots SET expired = expired + 1 WHERE id = :id", {"id": books.lot_id}
        )
        == 1
    )
    assert accepted(books.app, "UPDATE points_daily_totals SET points = points + 1") == 1
    assert accepted(books.app, "UPDATE points_participants SET tier = 'silver'") >= 1
    assert books.state() == before


@pytest.mark.parametrize(
    ("changes", "constraint"),
    [
        ({"occ": "2999-01-01T00:00:00Z"}, "not_from_the_future"),
        ({"points": 8}, "points_events_check"),
        ({"points": -1, "capped": True}, "points_events_check"),
        ({"earned": 2**256, "points": 0, "capped": True}, "points_events_earned_check"),
        ({"points": 3, "capped": False}, "cap_explained"),
        ({"points": 7, "capped": True}, "cap_explained"),
        ({"hash": b"\x01"}, "points_events_content_hash_check"),
    ],
)
def test_an_event_outside_the_invariants_is_refused(
    books: Books, changes: dict[str, Any], constraint: str
) -> None:
    before = books.state()
    error = refused(books.app, _EVENT, _event(books, **changes))
    assert error.sqlstate == CHECK_VIOLATION and error.diag.constraint_name == constraint
    assert books.state() == before


def test_an_event_is_accrued_once(books: Books) -> None:
    existing = "SELECT source, event_id FROM points_events LIMIT 1"
    with books.owner.connect() as conn:
        source, event_id = conn.execute(sa.text(existing)).one()
    error = refused(books.app, _EVENT.replace("'raw'", ":src"), _event(books, eid=event_id, src=source))
    assert error.sqlstate == "23505"


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE points_events SET points = points + 1",
        "DELETE FROM points_events",
        "UPDATE points_rules SET points = 1000",
        "DELETE FROM points_rules",
        "UPDATE points_claims SET trace_amount = 1",
        "DELETE FROM points_claim_lots",
        "UPDATE points_lots SET amount = amount + 1",
        "UPDATE points_lots SET expires_at = NULL",
        "DELETE FROM points_lots",
        "DELETE FROM points_daily_totals",
        "TRUNCATE points_events CASCADE",
        "INSERT INTO points_rules (event_type, version, points, created_by, created_at)"
        " VALUES ('raw.t', 1, 5, 'x', now() - interval '1 day')",
        "INSERT INTO points_events (source, event_id, participant_id, event_type, occurred_at, content_hash,"
        " batch_id, rule_id, tier, base_points, multiplier_bps, earned, points, capped, received_at)"
        " SELECT 'r', 'r', participant_id, event_type, occurred_at, content_hash, 1, rule_id, tier, 1, 1, 1,"
        " 1, false, now() + interval '1 day' FROM points_events LIMIT 1",
    ],
)
def test_the_app_role_cannot_rewrite_points_history(books: Books, sql: str) -> None:
    before = books.state()
    error = refused(books.app, sql)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE
    assert books.state() == before


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE points_events SET points = 0",
        "DELETE FROM points_events",
        "UPDATE points_rules SET points = 1000",
        "DELETE FROM points_claims",
        "DELETE FROM points_lots",
        "TRUNCATE points_events CASCADE",
        "TRUNCATE points_rules CASCADE",
        "TRUNCATE points_claims CASCADE",
    ],
)
def test_the_owner_is_stopped_by_the_append_only_triggers(books: Books, sql: str) -> None:
    before = books.state()
    error = refused(books.owner, sql)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE and "append-only" in str(error)
    assert books.state() == before


def test_a_rule_version_never_reaches_back(books: Books) -> None:
    past = (
        "INSERT INTO points_rules (event_type, version, points, effective_at, created_by)"
        " VALUES ('raw.t', 1, 5, now() - interval '1 second', 'x')"
    )
    error = refused(books.app, past)
    assert error.sqlstate == CHECK_VIOLATION and error.diag.constraint_name == "never_retroactive"
    gap = "INSERT INTO points_rules (event_type, version, points, created_by) VALUES (:t, 5, 5, 'x')"
    error = refused(books.app, gap, {"t": books.event_type})
    assert error.sqlstate == CHECK_VIOLATION and "version" in str(error)
    bad_multiplier = (
        "INSERT INTO points_rules (event_type, version, points, tier_multipliers, created_by)"
        " VALUES ('raw.t', 1, 5, :m, 'x')"
    )
    for multipliers in (
        '{"gold": 1.5}',
        '{"gold": -1}',
        '{"Gold": 100}',
        '{"gold": "100"}',
        '{"gold": 1000001}',
    ):
        error = refused(books.app, bad_multiplier, {"m": multipliers})
        assert error.sqlstate == CHECK_VIOLATION, multipliers


def test_lots_and_daily_totals_only_grow_and_never_overflow(books: Books) -> None:
    before = books.state()
    for sql in (
        "UPDATE points_lots SET expired = amount + 1",
        "UPDATE points_lots SET expired = -1",
        "UPDATE points_daily_totals SET points = -1",
    ):
        assert refused(books.app, sql).sqlstate == CHECK_VIOLATION, sql
    with books.owner.begin() as conn:
        conn.execute(sa.text("UPDATE points_lots SET expired = 1 WHERE id = :id"), {"id": books.lot_id})
    try:
        error = refused(
            books.owner, "UPDATE points_lots SET expired = 0 WHERE id = :id", {"id": books.lot_id}
        )
        assert error.sqlstate == CHECK_VIOLATION and "only records more expiry" in str(error)
        error = refused(books.owner, "UPDATE points_daily_totals SET points = points - 1")
        assert error.sqlstate == CHECK_VIOLATION and "never shrinks" in str(error)
    finally:
        # The owner may not lower it either; the module's database is dropped afterwards.
        pass
    after = books.state()
    assert after["points_events"] == before["points_events"]


def test_a_claim_takes_exactly_its_points_from_its_lots(books: Books) -> None:
    before = books.state()
    copy = (
        "INSERT INTO points_claims (key, participant_id, wallet, requested_points, points, trace_amount,"
        " points_per_trace, chain_id, outbox_key, requested_by)"
        " SELECT 'raw-claim', participant_id, wallet, 4, 4, 1, '2', chain_id, 'raw-outbox', 'x'"
        " FROM points_claims WHERE id = :c"
    )
    # A claim with no lots behind it fails at commit.
    error = refused(books.app, copy, {"c": books.claim_id})
    assert error.sqlstate == CHECK_VIOLATION and "takes 0 points" in str(error)
    assert books.state() == before


def test_a_settled_lot_never_changes_and_only_an_expired_lot_settles(books: Books) -> None:
    before = books.state()
    # The module's lot never expires: it cannot be settled.
    error = refused(books.app, "UPDATE points_lots SET settled = true WHERE id = :id", {"id": books.lot_id})
    assert error.sqlstate == CHECK_VIOLATION and "settled" in str(error)
    assert books.state() == before
    with books.owner.begin() as conn:
        lot = conn.execute(
            sa.text(
                "INSERT INTO points_lots (participant_id, batch_id, amount, expires_at, settled)"
                " VALUES (:p, 777, 10, now() - interval '1 day', true) RETURNING id"
            ),
            {"p": books.participant},
        ).scalar_one()
    for sql in (
        "UPDATE points_lots SET settled = false WHERE id = :id",
        "UPDATE points_lots SET expired = 1 WHERE id = :id",
    ):
        error = refused(books.app, sql, {"id": lot})
        assert error.sqlstate == CHECK_VIOLATION and "settled" in str(error), sql
