"""Raw SQL against the database in a transaction that is always rolled back: for tests that
show PostgreSQL itself refusing (or accepting) a write."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa


def refused(
    engine: sa.Engine,
    sql: str,
    params: dict[str, Any] | None = None,
    *,
    setup: tuple[str, ...] = (),
    at_commit: bool = False,
) -> psycopg.Error:
    """Run ``setup`` then ``sql`` in one transaction; ``sql`` must fail (or, with ``at_commit``,
    the commit after it may: deferred checks). Rolled back either way; returns the driver's
    error (its SQLSTATE and constraint name tell why)."""
    with engine.connect() as conn:
        conn.begin()
        for statement in setup:
            conn.execute(sa.text(statement))
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.execute(sa.text(sql), params or {})
            if at_commit:
                conn.commit()
        conn.rollback()
    error = info.value.orig
    assert isinstance(error, psycopg.Error), repr(info.value)
    return error


def accepted(engine: sa.Engine, sql: str, params: dict[str, Any] | None = None) -> int:
    """Run ``sql`` in a transaction that is rolled back; the rows it touched."""
    with engine.connect() as conn:
        conn.begin()
        touched = conn.execute(sa.text(sql), params or {}).rowcount
        conn.rollback()
    return int(touched)
