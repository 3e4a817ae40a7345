"""Reading a test ledger back: the helpers every layer of tests shares."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import sqlalchemy as sa

from ledger import db
from ledger.accounts import get_account
from ledger.check import check_ledger
from tests.conftest import APP_ROLE


def totals(engine: sa.Engine, code: str) -> tuple[int, int, int, int]:
    """(debits_posted, credits_posted, debits_pending, credits_pending) of ``code``."""
    with engine.connect() as conn:
        account = get_account(conn, code)
    return (account.debits_posted, account.credits_posted, account.debits_pending, account.credits_pending)


def assert_books_balance(engine: sa.Engine) -> dict[str, Any]:
    """Run the full ledger check; fail the test on any break; return the report."""
    with engine.connect() as conn:
        report = check_ledger(conn)
    assert report["ok"], report["breaks"]
    assert all(asset["balanced"] for asset in report["trial_balance"].values())
    return report


def check_report(url: str) -> dict[str, Any]:
    """The ledger check of the database at ``url``, read as the application role."""
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    try:
        with engine.connect() as conn:
            return check_ledger(conn)
    finally:
        engine.dispose()


def wait_for_lock_waiters(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Wait until ``count`` sessions of the database at ``url`` wait on a lock."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(db.libpq_url(url), autocommit=True) as admin:
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if row is not None and row[0] >= count:
                return
            time.sleep(0.01)
    raise AssertionError(f"{count} sessions never waited on a lock")
