"""The exceptions queue: breaks finance must look at, raised idempotently by key."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from ledger.commands import ChainRef


def open_exception(
    conn: sa.Connection,
    key: str,
    kind: str,
    details: Mapping[str, Any],
    chain: ChainRef | None = None,
    entry_key: str | None = None,
) -> bool:
    """Raise an exception for finance in the caller's transaction; False if ``key`` was raised before."""
    row = conn.execute(
        sa.text(
            "INSERT INTO finance_exceptions (key, kind, chain_id, tx_hash, log_index, entry_key, details)"
            " VALUES (:key, :kind, :chain_id, :tx_hash, :log_index, :entry_key, CAST(:details AS jsonb))"
            " ON CONFLICT (key) DO NOTHING RETURNING id"
        ),
        {
            "key": key,
            "kind": kind,
            "chain_id": chain.chain_id if chain else None,
            "tx_hash": chain.tx_hash if chain else None,
            "log_index": chain.log_index if chain else None,
            "entry_key": entry_key,
            "details": json.dumps(dict(details), sort_keys=True, default=str),
        },
    ).first()
    return row is not None


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
