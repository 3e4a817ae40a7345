"""DESIGN §3 invariants, enforced by PostgreSQL itself: raw SQL that tries to break each one fails.

Every attack runs on a psycopg connection of its own, either as the application role (what a
compromised or buggy process could do) or as the owner (what a careless migration could do),
and each asserts the specific error and that nothing changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg
from psycopg.rows import dict_row

from ledger import db
from ledger.accounts import create_account, create_asset, set_closed
from ledger.commands import Leg, NewEntry, Resolve, Reverse
from ledger.posting import Poster
from tests.books import check_report
from tests.conftest import APP_ROLE, Databases

UINT256_LIMIT = 2**256
ZERO_HASH = b"\x00" * 32

_TRANSFER_COLUMNS = (
    "entry_id",
    "kind",
    "debit_account_id",
    "credit_account_id",
    "asset_id",
    "amount",
    "pending_id",
    "timeout_at",
    "posted_at",
    "debit_posted_after",
    "debit_pending_after",
    "credit_posted_after",
    "credit_pending_after",
)
_INSERT_TRANSFER = (
    f"INSERT INTO ledger_transfers ({', '.join(_TRANSFER_COLUMNS)})"
    f" VALUES ({', '.join('%(' + c + ')s' for c in _TRANSFER_COLUMNS)})"
)


@dataclass
class Ledger:
    """A fresh database with a few accounts and entries booked through the engine."""

    url: str
    ids: dict[str, int]
    assets: dict[str, int]

    def connect(self, *, app: bool) -> psycopg.Connection[dict[str, Any]]:
        conn = psycopg.connect(db.libpq_url(self.url), row_factory=dict_row)
        if app:
            conn.execute(f"SET ROLE {APP_ROLE}")
            conn.commit()
        return conn

    def state(self) -> dict[str, Any]:
        """Everything an attack could change: row counts and every account row."""
        with self.connect(app=False) as conn:
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM ledger_entries) AS entries,"
                " (SELECT count(*) FROM ledger_transfers) AS transfers,"
                " (SELECT count(*) FROM audit_log) AS audit,"
                " (SELECT count(*) FROM ledger_accounts) AS accounts"
            ).fetchone()
            accounts = conn.execute("SELECT * FROM ledger_accounts ORDER BY id").fetchall()
        return {"counts": counts, "accounts": accounts}

    def check(self) -> None:
        report = check_report(self.url)
        assert report["ok"], report["breaks"]
        assert all(asset["balanced"] for asset in report["trial_balance"].values())


@pytest.fixture(scope="module")
def seeded(databases: Databases, template_db: str) -> Iterator[Ledger]:
    """A database with accounts and entries booked through the engine, the template of each test's."""
    name = databases.create(template=template_db)
    url = databases.url(name)
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    try:
        with engine.begin() as conn:
            create_asset(conn, "TRACE", 18)
            create_asset(conn, "PTS", 0)
            create_account(conn, "bank", "TRACE", "asset")
            create_account(conn, "alice", "TRACE", "liability", ["debits_must_not_exceed_credits"])
            create_account(conn, "bob", "TRACE", "liability")
            create_account(conn, "carol", "TRACE", "liability", ["debits_must_not_exceed_credits"])
            create_account(conn, "receivable", "TRACE", "asset", ["credits_must_not_exceed_debits"])
            create_account(conn, "old", "TRACE", "liability")
            create_account(conn, "points", "PTS", "liability")
            create_account(conn, "points:pool", "PTS", "equity")
        results = Poster(engine).post(
            [
                NewEntry("fund", (Leg("bank", "alice", 100),)),
                NewEntry("spend", (Leg("alice", "bob", 30),)),
                NewEntry("hold", (Leg("alice", "bob", 20, pending=True),)),
                NewEntry("hold-short", (Leg("bank", "bob", 5, pending=True, timeout_s=3600),)),
                NewEntry("hold-posted", (Leg("bank", "bob", 9, pending=True),)),
                Resolve("hold-posted:post", "hold-posted", "post", amount=4),
                NewEntry("owed", (Leg("receivable", "bank", 10),)),
                NewEntry("pts", (Leg("points:pool", "points", 7),)),
                NewEntry("to-old", (Leg("bank", "old", 1),)),
                Reverse("to-old:rev", "to-old"),
                # carol may spend 30; the flag locks the rest.
                NewEntry("fund-carol", (Leg("bank", "carol", 30),)),
            ]
        )
        assert all(r.status == "created" for r in results), results
        with engine.begin() as conn:
            set_closed(conn, "old", True)
            ids = {code: i for code, i in conn.exec_driver_sql("SELECT code, id FROM ledger_accounts")}
            assets = {code: i for code, i in conn.exec_driver_sql("SELECT code, id FROM ledger_assets")}
    finally:
        engine.dispose()  # a template database must have no sessions
    yield Ledger(url, ids, assets)


@pytest.fixture
def ledger(databases: Databases, seeded: Ledger) -> Iterator[Ledger]:
    """A copy of the seeded database for one test."""
    name = databases.create(template=seeded.url.rsplit("/", 1)[1])
    yield Ledger(databases.url(name), dict(seeded.ids), dict(seeded.assets))
    databases.drop(name)


def balances(conn: psycopg.Connection[dict[str, Any]], account_id: int) -> dict[str, Any]:
    row = conn.execute(
        "SELECT asset_id, debits_posted, credits_posted, debits_pending, credits_pending"
        " FROM ledger_accounts WHERE id = %s FOR UPDATE",
        (account_id,),
    ).fetchone()
    assert row is not None
    # Decimal arithmetic would round at 28 digits: compute with ints.
    return {k: int(v) for k, v in row.items()}


def new_entry(conn: psycopg.Connection[dict[str, Any]], key: str, **columns: Any) -> dict[str, Any]:
    """Insert an entry row by hand; returns id and posted_at.

    Like the engine, it is stamped with the clock *after* the caller locked its accounts, so
    each account's transfers stay in posted_at order.
    """
    values = {"kind": "raw", "content_hash": ZERO_HASH, **columns}
    names = ", ".join(values)
    row = conn.execute(
        f"INSERT INTO ledger_entries (idempotency_key, effective_at, posted_at, {names})"
        " VALUES (%(key)s, clock_timestamp(), clock_timestamp(),"
        f" {', '.join('%(' + n + ')s' for n in values)})"
        " RETURNING id, posted_at",
        {"key": key, **values},
    ).fetchone()
    assert row is not None
    return row


def transfer_row(
    conn: psycopg.Connection[dict[str, Any]],
    debit: int,
    credit: int,
    amount: int,
    *,
    kind: str = "posted",
    pending_id: int | None = None,
    held: int = 0,
) -> dict[str, Any]:
    """Lock both accounts and build a transfer row whose recorded balances follow from them.

    The row belongs to no entry yet: :func:`in_entry` adds it to one.
    """
    d, c = balances(conn, debit), balances(conn, credit)
    posted = amount if kind in ("posted", "post_pending") else 0
    pending = amount if kind == "pending" else (0 if kind == "posted" else -held)
    return {
        "entry_id": None,
        "kind": kind,
        "debit_account_id": debit,
        "credit_account_id": credit,
        "asset_id": d["asset_id"],
        "amount": amount,
        "pending_id": pending_id,
        "timeout_at": None,
        "posted_at": None,
        "debit_posted_after": d["debits_posted"] + posted,
        "debit_pending_after": d["debits_pending"] + pending,
        "credit_posted_after": c["credits_posted"] + posted,
        "credit_pending_after": c["credits_pending"] + pending,
    }


def in_entry(conn: psycopg.Connection[dict[str, Any]], key: str, *rows: dict[str, Any]) -> dict[str, Any]:
    """Insert an entry for ``rows`` (whose accounts are locked already) and point them at it."""
    entry = new_entry(conn, key)
    for row in rows:
        row["entry_id"], row["posted_at"] = entry["id"], entry["posted_at"]
    return rows[0] if rows else {}


def insert_many(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` in ONE statement (the trigger sees them together)."""
    values = ", ".join(
        "(" + ", ".join(f"%({c}_{i})s" for c in _TRANSFER_COLUMNS) + ")" for i in range(len(rows))
    )
    params = {f"{c}_{i}": row[c] for i, row in enumerate(rows) for c in _TRANSFER_COLUMNS}
    conn.execute(f"INSERT INTO ledger_transfers ({', '.join(_TRANSFER_COLUMNS)}) VALUES {values}", params)


def hold_transfer_id(ledger: Ledger, key: str) -> tuple[int, int]:
    """(transfer id, amount) of the hold booked under ``key``."""
    with ledger.connect(app=False) as conn:
        row = conn.execute(
            "SELECT t.id, t.amount FROM ledger_transfers t JOIN ledger_entries e ON e.id = t.entry_id"
            " WHERE e.idempotency_key = %s AND t.kind = 'pending'",
            (key,),
        ).fetchone()
    assert row is not None
    return row["id"], int(row["amount"])


def refused(conn: psycopg.Connection[Any], error: type[pg.Error], sql: str, params: Any = None) -> pg.Error:
    """Run ``sql``, expect exactly ``error``, roll back; returns the error for further checks."""
    with pytest.raises(error) as info:
        conn.execute(sql, params)
    conn.rollback()
    assert type(info.value) is error, repr(info.value)
    return info.value


# --- the baseline: a well-formed raw transfer is accepted -------------------------------


def test_a_well_formed_raw_transfer_by_the_app_role_is_booked(ledger: Ledger) -> None:
    """The control case: the refusals below are for the reason named, not a broken setup."""
    with ledger.connect(app=True) as conn:
        row = transfer_row(conn, ledger.ids["alice"], ledger.ids["bob"], 10)
        in_entry(conn, "raw-ok", row)
        conn.execute(_INSERT_TRANSFER, row)
        second = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 3)
        in_entry(conn, "raw-ok-2", second)
        conn.execute(_INSERT_TRANSFER, second)
        conn.commit()
        alice = balances(conn, ledger.ids["alice"])
    assert (alice["debits_posted"], alice["credits_posted"], alice["debits_pending"]) == (40, 103, 20)
    ledger.check()


# --- 1. transfers and entries are append-only ------------------------------------------

_REWRITES = [
    "UPDATE ledger_entries SET kind = 'forged'",
    "UPDATE ledger_entries SET metadata = '{\"x\": 1}'::jsonb",
    "DELETE FROM ledger_entries WHERE id = (SELECT max(id) FROM ledger_entries)",
    "TRUNCATE ledger_entries",
    "UPDATE ledger_transfers SET amount = amount + 1",
    "UPDATE ledger_transfers SET credit_account_id = debit_account_id, debit_account_id = credit_account_id",
    "DELETE FROM ledger_transfers WHERE kind = 'pending'",
    "TRUNCATE ledger_transfers",
    "DELETE FROM ledger_accounts WHERE code = 'bob'",
    "TRUNCATE ledger_accounts",
    "UPDATE audit_log SET actor = 'someone else'",
    "DELETE FROM audit_log",
    "TRUNCATE audit_log",
]


@pytest.mark.parametrize("sql", _REWRITES)
def test_the_app_role_may_not_rewrite_history(ledger: Ledger, sql: str) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        error = refused(conn, pg.InsufficientPrivilege, sql)
    assert "permission denied" in str(error)
    assert ledger.state() == before


@pytest.mark.parametrize("sql", [s for s in _REWRITES if "audit_log" not in s or "TRUNCATE" in s])
def test_the_owner_is_stopped_by_the_append_only_triggers(ledger: Ledger, sql: str) -> None:
    if "audit_log" in sql:
        # Make sure a row trigger would have a row to refuse.
        with ledger.connect(app=False) as conn:
            conn.execute(
                "INSERT INTO audit_log (actor, role, action, target, request_id)"
                " VALUES ('a', 'admin', 'x', 'y', 'r')"
            )
            conn.commit()
    before = ledger.state()
    with ledger.connect(app=False) as conn:
        error = refused(conn, pg.IntegrityConstraintViolation, sql)
    assert "append-only" in str(error) or "never deleted" in str(error)
    assert ledger.state() == before


def test_the_owner_cannot_rewrite_the_audit_log(ledger: Ledger) -> None:
    with ledger.connect(app=False) as conn:
        conn.execute(
            "INSERT INTO audit_log (actor, role, action, target, request_id)"
            " VALUES ('a', 'admin', 'x', 'y', 'r')"
        )
        conn.commit()
        before = ledger.state()
        refused(conn, pg.IntegrityConstraintViolation, "UPDATE audit_log SET actor = 'someone else'")
        refused(conn, pg.IntegrityConstraintViolation, "DELETE FROM audit_log")
    assert ledger.state() == before


def test_a_committed_entry_cannot_receive_more_transfers(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        entry = conn.execute(
            "SELECT id, posted_at FROM ledger_entries WHERE idempotency_key = 'fund'"
        ).fetchone()
        assert entry is not None
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 1000)
        row["entry_id"], row["posted_at"] = entry["id"], entry["posted_at"]
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    # The entry was booked before this transaction began: its booking time gives it away.
    assert "booking time outside this transaction" in str(error)
    assert ledger.state() == before


def test_an_entry_committed_by_a_later_transaction_cannot_receive_transfers(ledger: Ledger) -> None:
    # The booking time cannot tell: the entry was committed after this transaction began.
    with ledger.connect(app=True) as conn, ledger.connect(app=True) as other:
        conn.execute("SELECT now()")  # this transaction begins here
        booked = transfer_row(other, ledger.ids["bank"], ledger.ids["alice"], 5)
        in_entry(other, "committed-by-other", booked)
        other.execute(_INSERT_TRANSFER, booked)
        other.commit()
        before = ledger.state()
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 1000)
        row["entry_id"], row["posted_at"] = booked["entry_id"], booked["posted_at"]
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    assert "only be added by the transaction that books the entry" in str(error)
    assert ledger.state() == before


def test_history_cannot_be_backdated(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        entry = conn.execute(
            "INSERT INTO ledger_entries (idempotency_key, kind, content_hash, effective_at, posted_at)"
            " VALUES ('backdated', 'raw', %s, '2001-01-01Z', '2001-01-01Z') RETURNING id, posted_at",
            (ZERO_HASH,),
        ).fetchone()
        assert entry is not None
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 1000)
        row["entry_id"], row["posted_at"] = entry["id"], entry["posted_at"]
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    # Balance as of 2001 would otherwise change, and running balances would go out of order.
    assert "booking time outside this transaction" in str(error)
    assert ledger.state() == before


def test_history_order_holds_by_time_and_id(ledger: Ledger) -> None:
    # A transfer with a current booking time but an id below the account's newest transfer
    # (an id a rejected command left unused) would sort before history already read.
    with ledger.connect(app=True) as conn:
        newest = conn.execute(
            "SELECT max(id) AS id FROM ledger_transfers WHERE credit_account_id = %s",
            (ledger.ids["alice"],),
        ).fetchone()
        assert newest is not None
        before = ledger.state()
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 7)
        in_entry(conn, "low-id", row)
        row["id"] = newest["id"] - 1 if newest["id"] > 1 else 0
        columns = ["id", *_TRANSFER_COLUMNS]
        sql = (
            f"INSERT INTO ledger_transfers ({', '.join(columns)})"
            f" VALUES ({', '.join('%(' + c + ')s' for c in columns)})"
        )
        error = refused(conn, pg.CheckViolation, sql, row)
    assert error.diag.constraint_name == "history_not_backdated" or "unique" in str(error)
    assert ledger.state() == before


# --- 2. two different accounts of one asset, amount in range ---------------------------


@pytest.mark.parametrize(
    ("change", "error", "reason"),
    [
        ({"debit_account_id": "bob"}, pg.CheckViolation, "two_different_accounts"),
        ({"credit_account_id": "points"}, pg.CheckViolation, "asset mismatch"),
        ({"asset_id": "PTS"}, pg.CheckViolation, "asset mismatch"),
        ({"amount": 0}, pg.CheckViolation, "ledger_transfers_amount_check"),
        ({"amount": -5}, pg.CheckViolation, "ledger_transfers_amount_check"),
        ({"amount": UINT256_LIMIT}, pg.CheckViolation, "ledger_transfers_amount_check"),
        ({"amount": 10**78}, pg.NumericValueOutOfRange, "numeric field overflow"),
        # numeric(78, 0) rounds 1.5 to 2, which the recorded balances then contradict.
        ({"amount": Decimal("1.5")}, pg.CheckViolation, "do not follow"),
        ({"debit_account_id": 987654}, pg.CheckViolation, "unknown account"),
        ({"credit_account_id": 987654}, pg.CheckViolation, "unknown account"),
        ({"entry_id": 987654}, pg.CheckViolation, "unknown entry"),
        ({"credit_account_id": "old"}, pg.CheckViolation, "closed account"),
        ({"kind": "transfer"}, pg.CheckViolation, "ledger_transfers_kind_check"),
        ({"pending_id": "hold"}, pg.CheckViolation, "resolution_names_pending"),
        ({"timeout_at": "2030-01-01Z"}, pg.CheckViolation, "timeout_only_on_pending"),
        ({"posted_at": "2030-01-01Z"}, pg.CheckViolation, "booking time"),
    ],
)
def test_malformed_transfers_are_refused(
    ledger: Ledger, change: dict[str, Any], error: type[pg.Error], reason: str
) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 10)
        in_entry(conn, "raw-bad", row)
        for column, named in change.items():
            value = named
            if column.endswith("account_id") and isinstance(named, str):
                value = ledger.ids[named]
            elif column == "asset_id":
                value = ledger.assets[named]
            elif column == "pending_id":
                value = hold_transfer_id(ledger, named)[0]
            row[column] = value
        exc = refused(conn, error, _INSERT_TRANSFER, row)
    assert reason in (exc.diag.constraint_name or "") + str(exc), str(exc)
    assert ledger.state() == before
    ledger.check()


# --- 3. balances are the sum of the transfers ------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE ledger_accounts SET credits_posted = credits_posted + 1000 WHERE code = 'alice'",
        "UPDATE ledger_accounts SET debits_pending = 0 WHERE code = 'alice'",
        "UPDATE ledger_accounts SET debits_must_not_exceed_credits = false WHERE code = 'alice'",
        "UPDATE ledger_accounts SET asset_id = asset_id WHERE code = 'alice'",
        "UPDATE ledger_accounts SET code = 'mallory' WHERE code = 'alice'",
    ],
)
def test_the_app_role_cannot_set_balances_or_account_definitions(ledger: Ledger, sql: str) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        refused(conn, pg.InsufficientPrivilege, sql)
        # Claiming to be the transfer trigger does not help: the privilege is missing.
        conn.execute("SET tracechain.applying = 'on'")
        refused(conn, pg.InsufficientPrivilege, sql)
    assert ledger.state() == before


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            "UPDATE ledger_accounts SET credits_posted = credits_posted + 1000 WHERE code = 'alice'",
            "balances change only by inserting transfers",
        ),
        (
            "UPDATE ledger_accounts SET debits_pending = 0, credits_pending = 0",
            "balances change only by inserting transfers",
        ),
        (
            "UPDATE ledger_accounts SET debits_must_not_exceed_credits = false WHERE code = 'alice'",
            "only closed and metadata may change",
        ),
        (
            "UPDATE ledger_accounts SET asset_id = (SELECT id FROM ledger_assets WHERE code = 'PTS')"
            " WHERE code = 'bob'",
            "only closed and metadata may change",
        ),
        ("UPDATE ledger_accounts SET kind = 'asset' WHERE code = 'alice'", "only closed and metadata"),
    ],
)
def test_the_owner_cannot_set_balances_or_account_definitions(ledger: Ledger, sql: str, message: str) -> None:
    before = ledger.state()
    with ledger.connect(app=False) as conn:
        error = refused(conn, pg.IntegrityConstraintViolation, sql)
    assert message in str(error)
    assert ledger.state() == before


def test_accounts_start_with_zero_balances(ledger: Ledger) -> None:
    sql = (
        "INSERT INTO ledger_accounts (code, asset_id, kind, credits_posted)"
        " VALUES ('rich', (SELECT id FROM ledger_assets WHERE code = 'TRACE'), 'liability', 1000000)"
    )
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        refused(conn, pg.InsufficientPrivilege, sql)
    with ledger.connect(app=False) as conn:
        error = refused(conn, pg.IntegrityConstraintViolation, sql)
    assert "must start with zero balances" in str(error)
    assert ledger.state() == before


@pytest.mark.parametrize(
    "lie",
    [
        {"debit_posted_after": 1},
        {"credit_posted_after": -1},
        {"debit_pending_after": 1},
        {"credit_pending_after": 5},
    ],
)
def test_a_transfer_whose_recorded_balances_lie_is_refused(ledger: Ledger, lie: dict[str, int]) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 10)
        in_entry(conn, "raw-lie", row)
        for column, delta in lie.items():
            row[column] += delta
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    assert "resulting balances that do not follow" in str(error)
    assert ledger.state() == before


def test_running_balances_within_one_statement_must_chain(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        first = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 10)
        # The second row records balances as if the first did not exist.
        second = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 5)
        in_entry(conn, "raw-two", first, second)
        with pytest.raises(pg.CheckViolation, match="resulting balances that do not follow"):
            insert_many(conn, [first, second])
        conn.rollback()
        assert ledger.state() == before
        # Chained correctly, the same two rows are booked together.
        first = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 10)
        second = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 5)
        in_entry(conn, "raw-two", first, second)
        second["debit_posted_after"] += 10
        second["credit_posted_after"] += 10
        insert_many(conn, [first, second])
        conn.commit()
        bob = balances(conn, ledger.ids["bob"])
    assert bob["credits_posted"] == before_credits(before, ledger.ids["bob"]) + 15
    ledger.check()


def before_credits(state: dict[str, Any], account_id: int) -> int:
    return int(next(a["credits_posted"] for a in state["accounts"] if a["id"] == account_id))


# --- 4. trial balance ------------------------------------------------------------------


def test_trial_balance_holds_after_valid_raw_batches_and_failed_attacks(ledger: Ledger) -> None:
    with ledger.connect(app=True) as conn:
        for i in range(5):
            # One entry, two assets, both rows in one statement.
            trace = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], i + 1)
            points = transfer_row(conn, ledger.ids["points:pool"], ledger.ids["points"], 10 * (i + 1))
            in_entry(conn, f"raw-{i}", trace, points)
            insert_many(conn, [trace, points])
            conn.commit()
        for sql in _REWRITES[:3]:
            refused(conn, pg.InsufficientPrivilege, sql)
        lie = transfer_row(conn, ledger.ids["bank"], ledger.ids["bob"], 7)
        in_entry(conn, "raw-bad", lie)
        lie["credit_posted_after"] += 7
        refused(conn, pg.CheckViolation, _INSERT_TRANSFER, lie)
    with ledger.connect(app=False) as conn:
        refused(conn, pg.IntegrityConstraintViolation, _REWRITES[4])
        trial = conn.execute(
            "SELECT s.code, sum(a.debits_posted) = sum(a.credits_posted) AS posted,"
            " sum(a.debits_pending) = sum(a.credits_pending) AS pending, sum(a.credits_posted) AS total"
            " FROM ledger_accounts a JOIN ledger_assets s ON s.id = a.asset_id"
            " GROUP BY s.code ORDER BY s.code"
        ).fetchall()
    assert trial == [
        {"code": "PTS", "posted": True, "pending": True, "total": 7 + 150},
        {"code": "TRACE", "posted": True, "pending": True, "total": 100 + 30 + 4 + 10 + 1 + 1 + 30 + 15},
    ]
    ledger.check()


# --- 5. account flags, under any concurrency -------------------------------------------


@pytest.mark.parametrize(("kind", "amount"), [("posted", 51), ("pending", 51), ("posted", 10**30)])
def test_a_raw_overdraft_fails_on_the_check_constraint(ledger: Ledger, kind: str, amount: int) -> None:
    # alice: credits 100, debits 30, held 20 -> 50 available.
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        row = transfer_row(conn, ledger.ids["alice"], ledger.ids["bob"], amount, kind=kind)
        in_entry(conn, "raw-overdraft", row)
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    assert error.diag.constraint_name == "debits_must_not_exceed_credits"
    assert ledger.state() == before
    with ledger.connect(app=True) as conn:
        exact = transfer_row(conn, ledger.ids["alice"], ledger.ids["bob"], 50)
        in_entry(conn, "raw-exact", exact)
        conn.execute(_INSERT_TRANSFER, exact)
        conn.commit()
    ledger.check()


def test_a_raw_over_credit_fails_on_the_check_constraint(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        row = transfer_row(conn, ledger.ids["bob"], ledger.ids["receivable"], 11)
        in_entry(conn, "raw-over-credit", row)
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    assert error.diag.constraint_name == "credits_must_not_exceed_debits"
    assert ledger.state() == before


def _race(ledger: Ledger, workers: int, amount: int, *, lock_first: bool) -> list[str]:
    """``workers`` connections each try to move ``amount`` out of carol at the same moment."""
    ready = threading.Barrier(workers)
    outcomes: list[str] = []
    guard = threading.Lock()

    def spend(n: int) -> None:
        with ledger.connect(app=True) as conn:
            try:
                if lock_first:
                    ready.wait(timeout=30)
                    row = transfer_row(conn, ledger.ids["carol"], ledger.ids["bob"], amount)
                    in_entry(conn, f"race-{n}", row)
                else:
                    # Read (and compute) before anyone writes, then all insert together.
                    row = transfer_row(conn, ledger.ids["carol"], ledger.ids["bob"], amount)
                    conn.rollback()
                    ready.wait(timeout=30)
                    in_entry(conn, f"race-{n}", row)
                conn.execute(_INSERT_TRANSFER, row)
                conn.commit()
                outcome = "ok"
            except pg.CheckViolation as exc:
                conn.rollback()
                outcome = exc.diag.constraint_name or "refused by the transfer trigger"
        with guard:
            outcomes.append(outcome)

    threads = [threading.Thread(target=spend, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return sorted(outcomes)


def test_concurrent_raw_overdrafts_serialize_on_the_account_row(ledger: Ledger) -> None:
    outcomes = _race(ledger, 6, 10, lock_first=True)
    assert outcomes == ["debits_must_not_exceed_credits"] * 3 + ["ok"] * 3
    with ledger.connect(app=False) as conn:
        row = balances(conn, ledger.ids["carol"])
    assert (row["debits_posted"], row["credits_posted"]) == (30, 30)
    ledger.check()


def test_concurrent_raw_transfers_computed_from_a_stale_read_are_refused(ledger: Ledger) -> None:
    outcomes = _race(ledger, 6, 10, lock_first=False)
    # The first writer wins; every other row recorded balances that are no longer true.
    assert outcomes.count("ok") == 1
    assert len(outcomes) == 6
    # Refused as a lie about the balances, as booked before the winner, or as an overdraft.
    assert set(outcomes) - {"ok"} <= {
        "refused by the transfer trigger",
        "history_not_backdated",
        "debits_must_not_exceed_credits",
    }
    with ledger.connect(app=False) as conn:
        row = balances(conn, ledger.ids["carol"])
    assert (row["debits_posted"], row["credits_posted"]) == (10, 30)
    ledger.check()


def test_closed_accounts_refuse_raw_transfers_and_cannot_close_with_holds(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        row = transfer_row(conn, ledger.ids["old"], ledger.ids["bob"], 1)
        in_entry(conn, "raw-closed", row)
        assert "closed account" in str(refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row))
        # alice has an open hold: closing her account would strand it.
        error = refused(
            conn, pg.CheckViolation, "UPDATE ledger_accounts SET closed = true WHERE code = 'alice'"
        )
    assert error.diag.constraint_name == "closed_without_holds"
    with ledger.connect(app=False) as conn:
        error = refused(
            conn, pg.CheckViolation, "UPDATE ledger_accounts SET closed = true WHERE code = 'bob'"
        )
    assert error.diag.constraint_name == "closed_without_holds"
    assert ledger.state() == before


# --- 6. idempotency keys and holds are used once ---------------------------------------


def test_an_idempotency_key_is_stored_once(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        with pytest.raises(pg.UniqueViolation) as info:
            new_entry(conn, "fund")
        conn.rollback()
    assert info.value.diag.constraint_name == "ledger_entries_idempotency_key_key"
    assert ledger.state() == before


def test_an_entry_is_reversed_once(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        target = conn.execute("SELECT id FROM ledger_entries WHERE idempotency_key = 'to-old'").fetchone()
        assert target is not None
        with pytest.raises(pg.UniqueViolation) as info:
            new_entry(conn, "second-reversal", reverses_entry_id=target["id"])
        conn.rollback()
    assert info.value.diag.constraint_name == "ledger_entries_reversed_once"
    assert ledger.state() == before


def test_a_hold_is_resolved_once_even_by_raw_sql(ledger: Ledger) -> None:
    before = ledger.state()
    posted_hold, posted_amount = hold_transfer_id(ledger, "hold-posted")
    open_hold, open_amount = hold_transfer_id(ledger, "hold")
    with ledger.connect(app=True) as conn:
        # Void a hold that was already posted.
        row = transfer_row(
            conn,
            ledger.ids["bank"],
            ledger.ids["bob"],
            posted_amount,
            kind="void_pending",
            pending_id=posted_hold,
            held=posted_amount,
        )
        in_entry(conn, "raw-void-again", row)
        error = refused(conn, pg.UniqueViolation, _INSERT_TRANSFER, row)
        assert error.diag.constraint_name == "ledger_transfers_resolved_once"
        # Resolve an open hold twice in one transaction.
        first = transfer_row(
            conn,
            ledger.ids["alice"],
            ledger.ids["bob"],
            open_amount,
            kind="void_pending",
            pending_id=open_hold,
            held=open_amount,
        )
        in_entry(conn, "raw-void-1", first)
        conn.execute(_INSERT_TRANSFER, first)
        second = transfer_row(
            conn,
            ledger.ids["alice"],
            ledger.ids["bob"],
            5,
            kind="post_pending",
            pending_id=open_hold,
            held=open_amount,
        )
        in_entry(conn, "raw-void-2", second)
        error = refused(conn, pg.UniqueViolation, _INSERT_TRANSFER, second)
        assert error.diag.constraint_name == "ledger_transfers_resolved_once"
    assert ledger.state() == before
    ledger.check()


@pytest.mark.parametrize(
    ("hold", "kind", "amount", "accounts"),
    [
        ("hold", "post_pending", 21, ("alice", "bob")),  # more than held
        ("hold", "void_pending", 19, ("alice", "bob")),  # a void releases all of it
        ("hold", "expire", 20, ("alice", "bob")),  # no timeout
        ("hold-short", "expire", 5, ("bank", "bob")),  # timeout not reached
        ("hold", "void_pending", 20, ("bank", "bob")),  # other accounts than the hold's
        ("fund", "void_pending", 100, ("bank", "alice")),  # not a pending transfer
    ],
)
def test_raw_resolutions_must_match_their_hold(
    ledger: Ledger, hold: str, kind: str, amount: int, accounts: tuple[str, str]
) -> None:
    before = ledger.state()
    with ledger.connect(app=False) as conn:
        found = conn.execute(
            "SELECT t.id, t.amount FROM ledger_transfers t JOIN ledger_entries e ON e.id = t.entry_id"
            " WHERE e.idempotency_key = %s",
            (hold,),
        ).fetchone()
    assert found is not None
    with ledger.connect(app=True) as conn:
        row = transfer_row(
            conn,
            ledger.ids[accounts[0]],
            ledger.ids[accounts[1]],
            amount,
            kind=kind,
            pending_id=found["id"],
            held=int(found["amount"]),
        )
        in_entry(conn, "raw-resolve", row)
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, row)
    assert "does not resolve a matching pending transfer" in str(error)
    assert ledger.state() == before


# --- entries are whole ---------------------------------------------------------------


def test_an_entry_without_transfers_is_refused_at_commit(ledger: Ledger) -> None:
    # Such an entry would hold its key: the real booking would then answer "exists" and book nothing.
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        new_entry(conn, "chain:1:0xabc:0")
        with pytest.raises(pg.CheckViolation) as info:
            conn.commit()
    assert "needs at least one transfer" in str(info.value)
    assert ledger.state() == before


@pytest.mark.parametrize("one_statement", [False, True], ids=["statement-each", "one-statement"])
def test_an_entry_without_transfers_is_refused_among_whole_ones(ledger: Ledger, one_statement: bool) -> None:
    # The commit-time check covers every entry, whether each came in its own statement or all
    # three in one (the range between the first and the last id).
    before = ledger.state()
    keys = ["whole-1", "hollow-middle", "whole-2"]
    with ledger.connect(app=True) as conn:
        if one_statement:
            entries = conn.execute(
                "INSERT INTO ledger_entries (idempotency_key, kind, content_hash, effective_at, posted_at)"
                " SELECT k, 'raw', %s, clock_timestamp(), clock_timestamp() FROM unnest(%s::text[]) k"
                " RETURNING id, posted_at, idempotency_key",
                (ZERO_HASH, keys),
            ).fetchall()
            by_key = {e["idempotency_key"]: e for e in entries}
        else:
            by_key = {key: new_entry(conn, key) for key in keys}
        for key in ("whole-1", "whole-2"):
            row = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 1)
            row["entry_id"], row["posted_at"] = by_key[key]["id"], by_key[key]["posted_at"]
            conn.execute(_INSERT_TRANSFER, row)
        with pytest.raises(pg.CheckViolation) as info:
            conn.commit()
    assert "hollow-middle" in str(info.value)
    assert ledger.state() == before


def test_checking_entries_early_refuses_them_at_once(ledger: Ledger) -> None:
    # Asking for the check before the transfers exist cannot skip it: it fails there and then.
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        with pytest.raises(pg.CheckViolation) as info:
            new_entry(conn, "early")
        conn.rollback()
    assert "needs at least one transfer" in str(info.value)
    assert ledger.state() == before


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO ledger_entry_checks VALUES (1, 1)",
        "DELETE FROM ledger_entry_checks",
        "UPDATE ledger_entry_checks SET last_entry_id = first_entry_id",
        "TRUNCATE ledger_entry_checks",
        "ALTER TABLE ledger_entry_checks DISABLE TRIGGER ALL",
    ],
)
def test_the_app_role_cannot_touch_the_pending_entry_checks(ledger: Ledger, sql: str) -> None:
    with ledger.connect(app=True) as conn:
        error = refused(conn, pg.InsufficientPrivilege, sql)
    assert "ledger_entry_checks" in str(error)


def test_ledger_xid8_names_the_current_transaction_whatever_the_search_path(ledger: Ledger) -> None:
    # It is inlined into the owner's trigger (no SET clause), so every name in it is qualified.
    with ledger.connect(app=True) as conn:
        conn.execute("SET search_path = pg_temp, public")
        row = conn.execute(
            "SELECT public.ledger_xid8(pg_catalog.pg_current_xact_id()::xid)"
            " = pg_catalog.pg_current_xact_id() AS same"
        ).fetchone()
        conn.rollback()
    assert row is not None and row["same"] is True


def test_an_entry_booked_inside_a_savepoint_is_of_this_transaction(ledger: Ledger) -> None:
    # The entry row carries the subtransaction's xid, assigned after the top-level one: it is
    # still this transaction's, and its transfers are accepted.
    with ledger.connect(app=True) as conn:
        conn.execute("SELECT pg_catalog.pg_current_xact_id()")  # the top-level xid first
        conn.execute("SAVEPOINT booking")
        row = transfer_row(conn, ledger.ids["bank"], ledger.ids["alice"], 7)
        in_entry(conn, "in-savepoint", row)
        conn.execute(_INSERT_TRANSFER, row)
        seen = conn.execute(
            "SELECT ledger_xid8(xmin) > pg_current_xact_id() AS sub FROM ledger_entries"
            " WHERE idempotency_key = 'in-savepoint'"
        ).fetchone()
        conn.execute("RELEASE SAVEPOINT booking")
        conn.commit()
        alice = balances(conn, ledger.ids["alice"])
    assert seen is not None and seen["sub"] is True
    assert alice["credits_posted"] == 107
    ledger.check()


def test_no_entry_check_outlives_its_commit(ledger: Ledger) -> None:
    with ledger.connect(app=False) as conn:
        pending = conn.execute("SELECT count(*) AS n FROM ledger_entry_checks").fetchone()
    assert pending is not None and pending["n"] == 0


def test_a_reversal_must_mirror_the_entry_it_reverses(ledger: Ledger) -> None:
    # A stray "reversal" would otherwise block the real one (reversed at most once).
    with ledger.connect(app=True) as conn:
        target = conn.execute("SELECT id FROM ledger_entries WHERE idempotency_key = 'fund'").fetchone()
        assert target is not None
        before = ledger.state()
        row = transfer_row(conn, ledger.ids["alice"], ledger.ids["bank"], 1)
        entry = new_entry(conn, "fake-reversal", reverses_entry_id=target["id"])
        row["entry_id"], row["posted_at"] = entry["id"], entry["posted_at"]
        conn.execute(_INSERT_TRANSFER, row)
        with pytest.raises(pg.CheckViolation) as info:
            conn.commit()
    assert "mirror image" in str(info.value)
    assert ledger.state() == before


def test_check_reports_an_entry_without_transfers(ledger: Ledger) -> None:
    # Only an owner disabling the commit-time trigger gets one in; the check must notice.
    with ledger.connect(app=False) as conn:
        conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_complete")
        new_entry(conn, "hollow")
        conn.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_complete")
        conn.commit()
    report = check_report(ledger.url)
    assert not report["ok"]
    assert {"kind": "entry_without_transfers", "entry": "hollow"} in report["breaks"]


def test_the_app_role_cannot_shadow_ledger_tables_with_temporary_ones(ledger: Ledger) -> None:
    # A temporary ledger_transfers with a fake hold once let a void release funds twice
    # inside the owner's trigger function; the role may not create temporary tables at all.
    with ledger.connect(app=True) as conn:
        refused(conn, pg.InsufficientPrivilege, "CREATE TEMP TABLE ledger_transfers (id bigint)")
    with ledger.connect(app=False) as conn:
        path = conn.execute(
            "SELECT proconfig FROM pg_proc WHERE proname = 'ledger_apply_transfers'"
        ).fetchone()
    assert path is not None
    assert "search_path=pg_catalog, public, pg_temp" in path["proconfig"]


def test_the_migration_takes_temporary_tables_from_the_app_role(databases: Any) -> None:
    name = databases.create()
    url = databases.url(name)
    db.upgrade(url, role=APP_ROLE)
    with psycopg.connect(db.libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT has_database_privilege(%s, current_database(), 'TEMP')", (APP_ROLE,)
        ).fetchone()
    databases.drop(name)
    assert row is not None and row[0] is False


def test_a_timed_out_hold_can_only_expire(ledger: Ledger) -> None:
    # Raw SQL may not post a hold past its timeout (the engine refuses it as pending_expired).
    with ledger.connect(app=True) as conn:
        hold = transfer_row(conn, ledger.ids["alice"], ledger.ids["bob"], 5, kind="pending")
        in_entry(conn, "short-hold", hold)
        hold["timeout_at"] = hold["posted_at"] + timedelta(milliseconds=1)
        conn.execute(_INSERT_TRANSFER, hold)
        conn.commit()
    time.sleep(0.01)
    hold_id, amount = hold_transfer_id(ledger, "short-hold")
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        post = transfer_row(
            conn,
            ledger.ids["alice"],
            ledger.ids["bob"],
            amount,
            kind="post_pending",
            pending_id=hold_id,
            held=amount,
        )
        in_entry(conn, "late-post", post)
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, post)
    assert "does not resolve a matching pending transfer" in str(error)
    assert ledger.state() == before


def test_a_hold_cannot_time_out_before_it_is_booked(ledger: Ledger) -> None:
    before = ledger.state()
    with ledger.connect(app=True) as conn:
        hold = transfer_row(conn, ledger.ids["alice"], ledger.ids["bob"], 5, kind="pending")
        in_entry(conn, "born-expired", hold)
        hold["timeout_at"] = hold["posted_at"]
        error = refused(conn, pg.CheckViolation, _INSERT_TRANSFER, hold)
    assert error.diag.constraint_name == "timeout_after_booking"
    assert ledger.state() == before
