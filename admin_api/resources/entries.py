"""Journal entries: booking through the posting queue, reading them back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import marshmallow as ma
import sqlalchemy as sa

from admin_api.auth import POSTING_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.errors import Problem, documents_problems
from admin_api.resources import (
    BIGINT_MAX,
    BaseUnits,
    Blueprint,
    StrictBoolean,
    StrictSchema,
    id_cursor,
    json_object,
    ledger_check,
    ledger_state,
    page_limit,
)
from ledger.accounts import get_account
from ledger.commands import (
    KEY_MAX_CHARS,
    SYSTEM_KEY_PREFIX,
    TIMEOUT_MAX_S,
    ChainRef,
    Leg,
    NewEntry,
    Resolve,
    check_account_code,
    check_asset_code,
    check_caller_key,
    check_entry_kind,
)
from ledger.errors import Conflict, InvalidInput, LedgerError, NotFound

blp = Blueprint("entries", __name__, description="Journal entries (atomic groups of transfers)")


class IdempotencyHeaderSchema(ma.Schema):
    idempotency_key = ma.fields.String(
        data_key="Idempotency-Key",
        required=True,
        validate=ledger_check(check_caller_key),
        metadata={
            "description": f"Caller-chosen key (1-{KEY_MAX_CHARS} chars, not starting with"
            f" {SYSTEM_KEY_PREFIX!r}) that makes a retry safe"
        },
    )


class TransferInSchema(StrictSchema):
    debit = ma.fields.String(required=True, validate=ledger_check(check_account_code))
    credit = ma.fields.String(required=True, validate=ledger_check(check_account_code))
    amount = BaseUnits(required=True, metadata={"description": "Base units as a decimal string"})
    asset = ma.fields.String(validate=ledger_check(check_asset_code))
    pending = StrictBoolean(load_default=False, metadata={"description": "A hold (pending transfer)"})
    timeout_s = ma.fields.Integer(strict=True, validate=ma.validate.Range(1, TIMEOUT_MAX_S))


class ChainInSchema(StrictSchema):
    chain_id = ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(1, BIGINT_MAX))
    tx_hash = ma.fields.String(required=True)
    log_index = ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(0, 2**31 - 1))
    block_number = ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(0, BIGINT_MAX))
    block_hash = ma.fields.String(required=True)


class EntryInSchema(StrictSchema):
    kind = ma.fields.String(load_default="transfer", validate=ledger_check(check_entry_kind))
    transfers = ma.fields.List(
        ma.fields.Nested(TransferInSchema), required=True, validate=ma.validate.Length(1, 64)
    )
    metadata = json_object()
    effective_at = ma.fields.AwareDateTime(format="iso")
    chain = ma.fields.Nested(ChainInSchema)


class TransferSchema(ma.Schema):
    id = ma.fields.Integer()
    kind = ma.fields.String()
    debit = ma.fields.String()
    credit = ma.fields.String()
    asset = ma.fields.String()
    amount = ma.fields.String()
    pending_key = ma.fields.String(
        allow_none=True, metadata={"description": "Key of the hold this transfer resolves"}
    )
    timeout_at = ma.fields.DateTime(allow_none=True)


class ChainSchema(ma.Schema):
    chain_id = ma.fields.Integer()
    tx_hash = ma.fields.String()
    log_index = ma.fields.Integer()
    block_number = ma.fields.Integer()
    block_hash = ma.fields.String()


class EntrySchema(ma.Schema):
    id = ma.fields.Integer()
    key = ma.fields.String()
    kind = ma.fields.String()
    metadata = ma.fields.Dict()
    effective_at = ma.fields.DateTime()
    posted_at = ma.fields.DateTime()
    reverses = ma.fields.String(allow_none=True, metadata={"description": "Key of the entry it reverses"})
    chain = ma.fields.Nested(ChainSchema, allow_none=True)
    transfers = ma.fields.List(ma.fields.Nested(TransferSchema))


class EntryPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(EntrySchema))
    next = ma.fields.Integer(allow_none=True, metadata={"description": "Cursor of the next page (after=)"})


class EntryQuerySchema(StrictSchema):
    limit = page_limit()
    after = id_cursor()
    kind = ma.fields.String(validate=ledger_check(check_entry_kind))
    account = ma.fields.String(
        validate=ledger_check(check_account_code), metadata={"description": "Entries touching this account"}
    )
    since = ma.fields.AwareDateTime(format="iso", metadata={"description": "Booked at or after"})
    until = ma.fields.AwareDateTime(format="iso", metadata={"description": "Booked before"})


# --- reading -------------------------------------------------------------------------------

_ENTRY_SELECT = (
    "SELECT e.id, e.idempotency_key, e.kind, e.metadata, e.effective_at, e.posted_at,"
    " r.idempotency_key, e.chain_id, e.tx_hash, e.log_index, e.block_number, e.block_hash"
    " FROM ledger_entries e LEFT JOIN ledger_entries r ON r.id = e.reverses_entry_id"
)
_TRANSFER_SELECT = (
    "SELECT t.entry_id, t.id, t.kind, d.code, c.code, s.code, t.amount::text, pe.idempotency_key,"
    " t.timeout_at"
    " FROM ledger_transfers t"
    " JOIN ledger_accounts d ON d.id = t.debit_account_id"
    " JOIN ledger_accounts c ON c.id = t.credit_account_id"
    " JOIN ledger_assets s ON s.id = t.asset_id"
    " LEFT JOIN ledger_transfers p ON p.id = t.pending_id"
    " LEFT JOIN ledger_entries pe ON pe.id = p.entry_id"
    " WHERE t.entry_id = ANY(:ids) ORDER BY t.id"
)


def _entries_from_rows(conn: sa.Connection, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    by_id: dict[int, dict[str, Any]] = {}
    for r in rows:
        chain = (
            {"chain_id": r[7], "tx_hash": r[8], "log_index": r[9], "block_number": r[10], "block_hash": r[11]}
            if r[7] is not None
            else None
        )
        entry = {
            "id": r[0],
            "key": r[1],
            "kind": r[2],
            "metadata": r[3] if isinstance(r[3], dict) else json.loads(r[3]),
            "effective_at": r[4],
            "posted_at": r[5],
            "reverses": r[6],
            "chain": chain,
            "transfers": [],
        }
        entries.append(entry)
        by_id[r[0]] = entry
    if by_id:
        for t in conn.execute(sa.text(_TRANSFER_SELECT), {"ids": list(by_id)}):
            by_id[t[0]]["transfers"].append(
                {
                    "id": t[1],
                    "kind": t[2],
                    "debit": t[3],
                    "credit": t[4],
                    "asset": t[5],
                    "amount": t[6],
                    "pending_key": t[7],
                    "timeout_at": t[8],
                }
            )
    return entries


def read_entry(conn: sa.Connection, *, key: str | None = None, entry_id: int | None = None) -> dict[str, Any]:
    """One entry with its transfers, by idempotency key or id (404 unknown_entry)."""
    if key is not None:
        rows = conn.execute(sa.text(_ENTRY_SELECT + " WHERE e.idempotency_key = :k"), {"k": key}).all()
    else:
        rows = conn.execute(sa.text(_ENTRY_SELECT + " WHERE e.id = :i"), {"i": entry_id}).all()
    if not rows:
        raise NotFound("unknown_entry", f"no entry was booked under {key if key is not None else entry_id!r}")
    return _entries_from_rows(conn, rows)[0]


# --- booking -------------------------------------------------------------------------------


def book(command: NewEntry | Resolve) -> tuple[dict[str, Any], int]:
    """Book one command through the app's posting queue: (entry, 201) or (entry, 200) if it existed.

    A rejection raises the engine's code: 409 for an idempotency conflict, 422 otherwise.
    """
    state = ledger_state()
    results = state.queue.submit([command], actor=current_actor())
    if len(results) != 1:
        raise RuntimeError(f"the posting queue answered {len(results)} results for one command")
    result = results[0]
    state.metrics.observe_results(command.kind, results)
    if result.status == "rejected" or result.entry_id is None:
        code = result.code or "rejected"
        reason = result.reason or "the ledger refused the entry"
        if code == "idempotency_conflict":
            raise Conflict(code, reason)
        raise LedgerError(code, reason)
    with state.engine.connect() as conn:
        entry = read_entry(conn, entry_id=result.entry_id)
    return entry, 201 if result.status == "created" else 200


@blp.route("/entries", methods=["POST"])
@require_roles(*POSTING_ROLES)
@documents_problems(409, 422)
@blp.arguments(IdempotencyHeaderSchema, location="headers")
@blp.arguments(EntryInSchema)
@blp.response(201, EntrySchema, description="Booked")
@blp.alt_response(200, schema=EntrySchema, description="Booked earlier under the same key, same content")
def post_entry(headers: dict[str, Any], body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Book an entry: all its transfers or none. Amounts are decimal strings of base units.

    A transfer with `pending: true` is a hold (alone in its entry), resolved later through
    /holds/{pending_key}/post or /void, or expired after `timeout_s`.

    The ledger's rejections are 422 problems whose `code` says why: `unknown_account`,
    `unknown_asset`, `asset_mismatch`, `account_closed`, `exceeds_credits`, `exceeds_debits`.
    The same `Idempotency-Key` with other content is 409 `idempotency_conflict`; with the
    same content the answer is 200 with the entry booked first.
    """
    try:
        legs = tuple(
            Leg(t["debit"], t["credit"], t["amount"], t.get("asset"), t["pending"], t.get("timeout_s"))
            for t in body["transfers"]
        )
        chain = ChainRef(**body["chain"]) if "chain" in body else None
        command = NewEntry(
            headers["idempotency_key"],
            legs,
            kind=body["kind"],
            metadata=body.get("metadata") or {},
            effective_at=body.get("effective_at"),
            chain=chain,
        )
    except InvalidInput as exc:
        raise Problem.invalid_body(exc.message) from exc
    return book(command)


@blp.route("/entries/<path:key>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200, EntrySchema)
def get_entry(key: str) -> dict[str, Any]:
    """One entry and its transfers, by idempotency key."""
    with ledger_state().engine.connect() as conn:
        return read_entry(conn, key=key)


@blp.route("/entries", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.arguments(EntryQuerySchema, location="query")
@blp.response(200, EntryPageSchema)
def list_entries(query: dict[str, Any]) -> dict[str, Any]:
    """Entries by id, a page at a time; filter by kind, account (404 if unknown) and booking time."""
    limit: int = query["limit"]
    where = ["true"]
    params: dict[str, Any] = {"limit": limit + 1}
    with ledger_state().engine.connect() as conn:
        if "after" in query:
            where.append("e.id > :after")
            params["after"] = query["after"]
        if "kind" in query:
            where.append("e.kind = :kind")
            params["kind"] = query["kind"]
        if "since" in query:
            where.append("e.posted_at >= :since")
            params["since"] = query["since"]
        if "until" in query:
            where.append("e.posted_at < :until")
            params["until"] = query["until"]
        if "account" in query:
            params["account_id"] = get_account(conn, query["account"]).id
            where.append(
                "e.id IN (SELECT entry_id FROM ledger_transfers WHERE debit_account_id = :account_id"
                " UNION ALL SELECT entry_id FROM ledger_transfers WHERE credit_account_id = :account_id)"
            )
        rows = conn.execute(
            sa.text(_ENTRY_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY e.id LIMIT :limit"), params
        ).all()
        items = _entries_from_rows(conn, rows[:limit])
    return {"items": items, "next": items[-1]["id"] if len(rows) > limit else None}
