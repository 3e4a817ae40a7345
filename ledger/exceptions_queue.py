"""The exceptions queue: breaks finance must look at, raised idempotently by key."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ledger.commands import ChainRef


@dataclass(frozen=True, slots=True)
class NewException:
    """A break to raise; ``key`` makes raising it idempotent."""

    key: str
    kind: str
    details: Mapping[str, Any]
    chain: ChainRef | None = None
    entry_key: str | None = None


def open_exception(
    conn: sa.Connection,
    key: str,
    kind: str,
    details: Mapping[str, Any],
    chain: ChainRef | None = None,
    entry_key: str | None = None,
) -> bool:
    """Raise an exception for finance in the caller's transaction; False if ``key`` was raised before."""
    return open_exceptions(conn, [NewException(key, kind, details, chain, entry_key)]) == 1


def open_exceptions(conn: sa.Connection, breaks: Sequence[NewException]) -> int:
    """Raise several exceptions in one statement; returns how many were new."""
    if not breaks:
        return 0
    return int(
        conn.execute(
            sa.text(
                "WITH raised AS (INSERT INTO finance_exceptions (key, kind, chain_id, tx_hash, log_index,"
                " entry_key, details)"
                " SELECT * FROM unnest(CAST(:key AS text[]), CAST(:kind AS text[]),"
                " CAST(:chain_id AS bigint[]), CAST(:tx_hash AS text[]), CAST(:log_index AS integer[]),"
                " CAST(:entry_key AS text[]),"
                " CAST(:details AS jsonb[]))"
                " ON CONFLICT (key) DO NOTHING RETURNING 1) SELECT count(*) FROM raised"
            ),
            {
                "key": [b.key for b in breaks],
                "kind": [b.kind for b in breaks],
                "chain_id": [b.chain.chain_id if b.chain else None for b in breaks],
                "tx_hash": [b.chain.tx_hash if b.chain else None for b in breaks],
                "log_index": [b.chain.log_index if b.chain else None for b in breaks],
                "entry_key": [b.entry_key for b in breaks],
                "details": [json.dumps(dict(b.details), sort_keys=True, default=str) for b in breaks],
            },
        ).scalar_one()
    )


def list_open(conn: sa.Connection, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Open exceptions, oldest first."""
    rows = conn.execute(
        sa.text(
            "SELECT id, key, kind, chain_id, tx_hash, log_index, entry_key, details, created_at"
            " FROM finance_exceptions WHERE status = 'open' AND (CAST(:kind AS text) IS NULL OR kind = :kind)"
            " ORDER BY id LIMIT :limit"
        ),
        {"kind": kind, "limit": limit},
    ).mappings()
    return [dict(r) for r in rows]
