"""PostgreSQL advisory locks that make a process the only one doing a job (one indexer per chain,
one sender per signing key). The lock lives on its own session, so a process that dies releases it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

# Namespaces (the first key of the two-key advisory lock).
INDEXER_LOCKS = 7_310_001
SENDER_LOCKS = 7_310_002


@contextmanager
def exclusive(engine: sa.Engine, namespace: int, key: int) -> Iterator[bool]:
    """``with exclusive(engine, ns, key) as got:`` True while this process holds the lock,
    False (without waiting) when another holds it."""
    key = key % 2**31
    with engine.connect() as conn:
        got = bool(
            conn.execute(sa.text("SELECT pg_try_advisory_lock(:n, :k)"), {"n": namespace, "k": key}).scalar()
        )
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:n, :k)"), {"n": namespace, "k": key})
                conn.commit()
