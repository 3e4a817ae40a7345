"""The outbox of chain actions (DESIGN §6): written in the same transaction as the ledger holds
that reserve the funds, settled when the chain's receipt is confirmed.

No web3 here: a chain action is an address, calldata, value and gas limit; signing and sending
belong to the sender in ``workers``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from ledger.accounts import Created
from ledger.commands import ChainRef, NewEntry, Resolve, canonical_metadata, check_key
from ledger.custody import check_address
from ledger.engine import post_batch
from ledger.errors import Conflict, InvalidInput, LedgerError
from ledger.exceptions_queue import open_exception
from ledger.money import check_amount

_ACTION = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
GAS_LIMIT_MAX = 30_000_000


@dataclass(frozen=True, slots=True)
class ChainAction:
    """One transaction the platform decided to send, from ``signer`` to ``to_address``."""

    key: str
    chain_id: int
    signer: str
    action: str
    to_address: str
    data: bytes
    gas_limit: int
    value: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_key(self.key)
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise InvalidInput("chain_id must be a positive integer")
        object.__setattr__(self, "signer", check_address(self.signer))
        object.__setattr__(self, "to_address", check_address(self.to_address))
        if not isinstance(self.action, str) or not _ACTION.fullmatch(self.action):
            raise InvalidInput(f"action must match {_ACTION.pattern}")
        if not isinstance(self.data, bytes):
            raise InvalidInput("data must be bytes")
        if isinstance(self.gas_limit, bool) or not isinstance(self.gas_limit, int):
            raise InvalidInput("gas_limit must be an integer")
        if not 21_000 <= self.gas_limit <= GAS_LIMIT_MAX:
            raise InvalidInput(f"gas_limit must be between 21000 and {GAS_LIMIT_MAX}")
        if self.value != 0:
            check_amount(self.value)
        canonical_metadata(self.metadata)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    key: str
    status: str
    hold_keys: tuple[str, ...]
    tx_hash: str | None
    nonce: int | None


def enqueue(
    conn: sa.Connection, action: ChainAction, holds: Sequence[NewEntry] = ()
) -> tuple[OutboxRow, Created]:
    """Book ``holds`` and write the outbox row for ``action`` in the caller's transaction.

    Idempotent on ``action.key``: the same action again returns the existing row (``exists``),
    a different one under the same key is an idempotency conflict. A hold the ledger refuses
    (e.g. insufficient funds) refuses the whole action; the caller's transaction must then be
    rolled back, and nothing is written. So is a hold whose key is already booked: each action
    books its own holds.
    """
    if any(len(h.legs) != 1 or not h.legs[0].pending for h in holds):
        raise InvalidInput("each hold of a chain action must be one pending transfer")
    if any(h.legs[0].timeout_s is not None for h in holds):
        # A hold that timed out could no longer be posted when the transaction confirms.
        raise InvalidInput("the holds of a chain action must not time out")
    hold_keys = [h.key for h in holds]
    if len(set(hold_keys)) != len(hold_keys):
        raise InvalidInput("the holds of a chain action need distinct keys")
    # The row first, the holds last: the holds lock their accounts until the caller commits,
    # and some (fees, clearing) are hot, so nothing else of this transaction runs under those locks.
    # A concurrent enqueue of the same key waits on the unique key, then finds the row.
    row = conn.execute(
        sa.text(
            "INSERT INTO chain_outbox (key, chain_id, signer, action, to_address, data, value, gas_limit,"
            " hold_keys, metadata) VALUES (:key, :chain_id, :signer, :action, :to, :data, :value, :gas,"
            " :holds, CAST(:meta AS jsonb)) ON CONFLICT (key) DO NOTHING RETURNING id"
        ),
        {
            "key": action.key,
            "chain_id": action.chain_id,
            "signer": action.signer,
            "action": action.action,
            "to": action.to_address,
            "data": action.data,
            "value": action.value,
            "gas": action.gas_limit,
            "holds": hold_keys,
            "meta": canonical_metadata(action.metadata),
        },
    ).scalar_one_or_none()
    if row is None:
        existing = _get(conn, action.key)
        if existing is None:
            raise RuntimeError(f"chain action {action.key!r} conflicted but cannot be read")
        if not _same(conn, existing.id, action, hold_keys):
            raise Conflict("idempotency_conflict", f"chain action {action.key!r} exists with other content")
        return existing, "exists"
    results = post_batch(conn, list(holds))
    for hold, result in zip(holds, results, strict=True):
        if result.status == "rejected":
            raise LedgerError(result.code or "rejected", f"hold {hold.key!r}: {result.reason}")
        if result.status == "exists":
            # Booked before, for another action: one reservation must not fund two transactions.
            raise Conflict("hold_exists", f"hold {hold.key!r} is already booked; each action books its own")
    return OutboxRow(int(row), action.key, "queued", tuple(hold_keys), None, None), "created"


def _get(conn: sa.Connection, key: str) -> OutboxRow | None:
    row = conn.execute(
        sa.text("SELECT id, key, status, hold_keys, tx_hash, nonce FROM chain_outbox WHERE key = :k"),
        {"k": key},
    ).first()
    if row is None:
        return None
    return OutboxRow(row.id, row.key, row.status, tuple(row.hold_keys), row.tx_hash, row.nonce)


def _same(conn: sa.Connection, outbox_id: int, action: ChainAction, hold_keys: list[str]) -> bool:
    row = conn.execute(
        sa.text(
            "SELECT chain_id, signer, action, to_address, data, value, gas_limit, hold_keys, metadata"
            " FROM chain_outbox WHERE id = :id"
        ),
        {"id": outbox_id},
    ).one()
    return (
        row.chain_id == action.chain_id
        and row.signer == action.signer
        and row.action == action.action
        and row.to_address == action.to_address
        and bytes(row.data) == action.data
        and int(row.value) == action.value
        and row.gas_limit == action.gas_limit
        and list(row.hold_keys) == hold_keys
        and json.dumps(row.metadata, sort_keys=True) == json.dumps(dict(action.metadata), sort_keys=True)
    )


@dataclass(frozen=True, slots=True)
class Settlement:
    """A confirmed receipt of an outbox row's transaction."""

    outbox_id: int
    succeeded: bool
    tx_hash: str
    block_number: int
    block_hash: str
    error: str | None = None
    chain_refs: Mapping[str, ChainRef] = field(default_factory=dict)


def settle(
    conn: sa.Connection,
    outbox_id: int,
    *,
    succeeded: bool,
    tx_hash: str,
    block_number: int,
    block_hash: str,
    error: str | None = None,
    chain_refs: Mapping[str, ChainRef] | None = None,
) -> str:
    """Settle one row on its confirmed receipt (see :func:`settle_many`)."""
    settlement = Settlement(outbox_id, succeeded, tx_hash, block_number, block_hash, error, chain_refs or {})
    return settle_many(conn, [settlement])[0]


def settle_many(conn: sa.Connection, settlements: Sequence[Settlement]) -> list[str]:
    """Settle rows on their confirmed receipts in the caller's transaction: success posts a row's
    holds, failure voids them and raises an exception for finance. Returns each row's final
    status, in order; settling a row twice is a no-op. One lock, one booking batch and one update
    for all of them."""
    if not settlements:
        return []
    ids = [s.outbox_id for s in settlements]
    if len(set(ids)) != len(ids):
        raise InvalidInput("each outbox row settles once per call")
    rows = {
        r.id: r
        for r in conn.execute(
            sa.text(
                "SELECT id, key, status, hold_keys FROM chain_outbox WHERE id = ANY(:ids)"
                " ORDER BY id FOR UPDATE"
            ),
            {"ids": ids},
        )
    }
    missing = sorted(set(ids) - set(rows))
    if missing:
        raise InvalidInput(f"no outbox rows {missing[:5]}")
    commands: list[Resolve] = []
    settling: list[Settlement] = []
    for settlement in settlements:
        row = rows[settlement.outbox_id]
        if row.status in ("confirmed", "failed"):
            continue
        if row.status not in ("signed", "sent"):
            raise InvalidInput(f"outbox row {row.key!r} is {row.status}; only a sent action settles")
        action: Literal["post", "void"] = "post" if settlement.succeeded else "void"
        settling.append(settlement)
        commands.extend(
            Resolve(
                key=f"settle:{hold_key}",
                pending_key=hold_key,
                action=action,
                metadata={
                    "outbox": row.key,
                    "tx_hash": settlement.tx_hash,
                    "block_number": settlement.block_number,
                },
                chain=settlement.chain_refs.get(hold_key),
            )
            for hold_key in row.hold_keys
        )
    if settling:
        conn.execute(
            sa.text(
                "UPDATE chain_outbox o SET status = u.status, tx_hash = u.tx, block_number = u.bn,"
                " block_hash = u.bh, error = u.err, updated_at = now()"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:st AS text[]), CAST(:tx AS text[]),"
                " CAST(:bn AS bigint[]), CAST(:bh AS text[]), CAST(:err AS text[]))"
                " AS u(id, status, tx, bn, bh, err)"
                " WHERE o.id = u.id"
            ),
            {
                "ids": [s.outbox_id for s in settling],
                "st": ["confirmed" if s.succeeded else "failed" for s in settling],
                "tx": [s.tx_hash for s in settling],
                "bn": [s.block_number for s in settling],
                "bh": [s.block_hash for s in settling],
                "err": [None if s.succeeded else (s.error or "reverted") for s in settling],
            },
        )
    # The holds last: they lock hot accounts (fees, clearing) until the commit.
    for command, result in zip(commands, post_batch(conn, commands), strict=True):
        if result.status == "rejected":
            raise LedgerError(result.code or "rejected", f"settling {command.key!r}: {result.reason}")
    for settlement in settling:
        if settlement.succeeded:
            continue
        row = rows[settlement.outbox_id]
        open_exception(
            conn,
            f"outbox_failed:{row.key}",
            "chain_action_failed",
            {
                "outbox": row.key,
                "tx_hash": settlement.tx_hash,
                "error": settlement.error or "reverted",
                "holds_voided": list(row.hold_keys),
            },
        )
    final = {s.outbox_id: ("confirmed" if s.succeeded else "failed") for s in settling}
    return [final.get(i, str(rows[i].status)) for i in ids]
