"""The exceptions queue: breaks finance must look at, raised idempotently by key."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ledger import audit
from ledger.accounts import get_account
from ledger.audit import Actor, AuditRecord
from ledger.commands import ChainRef, Leg, NewEntry, check_account_code
from ledger.engine import post_batch
from ledger.errors import Conflict, InvalidInput, LedgerError, NotFound
from ledger.money import check_amount


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


# -- working the queue ----------------------------------------------------------------------
#
# Finance assigns a break, writes notes, and resolves it: a manual match (the books and the chain
# agree after all, and the note says why) or a write-off, an entry one finance user proposes and
# a second approves (maker-checker: PostgreSQL refuses a decision by the proposer). Every step is
# audited in the same transaction.

NOTE_MAX_CHARS = 4000
NAME_MAX_CHARS = 200
_COLUMNS = (
    "id, key, kind, chain_id, tx_hash, log_index, entry_key, details, status, created_at, assignee,"
    " resolution, resolved_by, resolved_at, resolution_note, resolution_entry_key,"
    " EXTRACT(EPOCH FROM coalesce(resolved_at, now()) - created_at)::bigint AS age_s"
)


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidInput(f"{what} must be 1 to {limit} characters")
    return value


def _exception_dict(row: Any) -> dict[str, Any]:
    return {
        "id": int(row.id),
        "key": row.key,
        "kind": row.kind,
        "chain_id": row.chain_id,
        "tx_hash": row.tx_hash,
        "log_index": row.log_index,
        "entry_key": row.entry_key,
        "details": row.details,
        "status": row.status,
        "created_at": row.created_at.isoformat(),
        "age_s": int(row.age_s),
        "assignee": row.assignee,
        "resolution": row.resolution,
        "resolved_by": row.resolved_by,
        "resolved_at": None if row.resolved_at is None else row.resolved_at.isoformat(),
        "resolution_note": row.resolution_note,
        "resolution_entry_key": row.resolution_entry_key,
    }


def list_exceptions(
    conn: sa.Connection,
    *,
    status: str | None = None,
    kind: str | None = None,
    assignee: str | None = None,
    after: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Exceptions by id (oldest first), filtered; keyset-paginated with ``after``."""
    if status is not None and status not in ("open", "resolved"):
        raise InvalidInput("status must be 'open' or 'resolved'")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000")
    rows = conn.execute(
        sa.text(
            f"SELECT {_COLUMNS} FROM finance_exceptions"
            " WHERE (CAST(:status AS text) IS NULL OR status = :status)"
            " AND (CAST(:kind AS text) IS NULL OR kind = :kind)"
            " AND (CAST(:assignee AS text) IS NULL OR assignee = :assignee)"
            " AND (CAST(:after AS bigint) IS NULL OR id > :after)"
            " ORDER BY id LIMIT :limit"
        ),
        {"status": status, "kind": kind, "assignee": assignee, "after": after, "limit": limit},
    ).all()
    return [_exception_dict(r) for r in rows]


def get_exception(conn: sa.Connection, exception_id: int) -> dict[str, Any]:
    """One exception with its notes and write-off proposals."""
    row = _row(conn, exception_id, lock=False)
    out = _exception_dict(row)
    out["notes"] = [
        {"id": int(n.id), "author": n.author, "note": n.note, "at": n.created_at.isoformat()}
        for n in conn.execute(
            sa.text(
                "SELECT id, author, note, created_at FROM finance_exception_notes"
                " WHERE exception_id = :id ORDER BY id"
            ),
            {"id": row.id},
        )
    ]
    out["writeoffs"] = [
        _writeoff_dict(w)
        for w in conn.execute(
            sa.text(
                f"SELECT {_WRITEOFF_COLUMNS} FROM finance_writeoffs WHERE exception_id = :id ORDER BY id"
            ),
            {"id": row.id},
        )
    ]
    return out


def _row(conn: sa.Connection, exception_id: int, *, lock: bool) -> Any:
    if isinstance(exception_id, bool) or not isinstance(exception_id, int) or not 0 < exception_id < 2**63:
        raise InvalidInput("exception id must be a positive integer")
    row = conn.execute(
        sa.text(
            f"SELECT {_COLUMNS} FROM finance_exceptions WHERE id = :id" + (" FOR UPDATE" if lock else "")
        ),
        {"id": exception_id},
    ).first()
    if row is None:
        raise NotFound("unknown_exception", f"no exception {exception_id}")
    return row


def _open_row(conn: sa.Connection, exception_id: int) -> Any:
    row = _row(conn, exception_id, lock=True)
    if row.status != "open":
        raise Conflict(
            "exception_resolved", f"exception {exception_id} is already resolved ({row.resolution})"
        )
    return row


def _audit(conn: sa.Connection, actor: Actor, action: str, target: str, before: Any, after: Any) -> None:
    audit.record(conn, [AuditRecord(actor, action, target, before, after)])


def assign(conn: sa.Connection, exception_id: int, assignee: str, actor: Actor) -> dict[str, Any]:
    """Give an open exception to ``assignee`` (a staff member's name or key)."""
    _text(assignee, "assignee", NAME_MAX_CHARS)
    row = _open_row(conn, exception_id)
    conn.execute(
        sa.text("UPDATE finance_exceptions SET assignee = :a WHERE id = :id"), {"a": assignee, "id": row.id}
    )
    _audit(
        conn,
        actor,
        "exception.assign",
        f"exception:{row.id}",
        {"assignee": row.assignee},
        {"assignee": assignee},
    )
    return get_exception(conn, int(row.id))


def add_note(conn: sa.Connection, exception_id: int, note: str, actor: Actor) -> dict[str, Any]:
    """Add a note to an exception, open or resolved (notes are kept for good)."""
    _text(note, "note", NOTE_MAX_CHARS)
    row = _row(conn, exception_id, lock=False)
    conn.execute(
        sa.text("INSERT INTO finance_exception_notes (exception_id, author, note) VALUES (:id, :a, :n)"),
        {"id": row.id, "a": actor.actor, "n": note},
    )
    _audit(conn, actor, "exception.note", f"exception:{row.id}", None, {"note": note})
    return get_exception(conn, int(row.id))


def resolve_match(conn: sa.Connection, exception_id: int, note: str, actor: Actor) -> dict[str, Any]:
    """Resolve an open exception as a manual match: ``note`` says why the books and the chain agree.
    Refused while a write-off for it waits for approval."""
    _text(note, "note", NOTE_MAX_CHARS)
    row = _open_row(conn, exception_id)
    _no_open_writeoff(conn, int(row.id))
    conn.execute(
        sa.text(
            "UPDATE finance_exceptions SET status = 'resolved', resolution = 'manual_match',"
            " resolved_by = :by, resolved_at = now(), resolution_note = :note WHERE id = :id"
        ),
        {"by": actor.actor, "note": note, "id": row.id},
    )
    _audit(
        conn,
        actor,
        "exception.match",
        f"exception:{row.id}",
        {"status": "open"},
        {"status": "resolved", "resolution": "manual_match", "note": note},
    )
    return get_exception(conn, int(row.id))


def _no_open_writeoff(conn: sa.Connection, exception_id: int) -> None:
    waiting = conn.execute(
        sa.text("SELECT id FROM finance_writeoffs WHERE exception_id = :id AND status = 'proposed'"),
        {"id": exception_id},
    ).scalar_one_or_none()
    if waiting is not None:
        raise Conflict(
            "writeoff_pending", f"write-off {waiting} for exception {exception_id} awaits a decision"
        )


_WRITEOFF_COLUMNS = (
    "id, exception_id, debit, credit, asset, amount::text AS amount, reason, proposed_by, proposed_at,"
    " status, decided_by, decided_at, entry_key"
)


def _writeoff_dict(row: Any) -> dict[str, Any]:
    return {
        "id": int(row.id),
        "exception_id": int(row.exception_id),
        "debit": row.debit,
        "credit": row.credit,
        "asset": row.asset,
        "amount": row.amount,
        "reason": row.reason,
        "proposed_by": row.proposed_by,
        "proposed_at": row.proposed_at.isoformat(),
        "status": row.status,
        "decided_by": row.decided_by,
        "decided_at": None if row.decided_at is None else row.decided_at.isoformat(),
        "entry_key": row.entry_key,
    }


def propose_writeoff(
    conn: sa.Connection,
    exception_id: int,
    *,
    debit: str,
    credit: str,
    amount: int,
    reason: str,
    actor: Actor,
) -> dict[str, Any]:
    """Propose the entry that writes an open exception off: ``amount`` from ``debit`` to ``credit``
    (accounts of one asset). Nothing is booked until a second finance user approves."""
    check_account_code(debit)
    check_account_code(credit)
    if debit == credit:
        raise InvalidInput("a write-off moves money between two different accounts")
    check_amount(amount)
    _text(reason, "reason", NOTE_MAX_CHARS)
    row = _open_row(conn, exception_id)
    _no_open_writeoff(conn, int(row.id))
    debit_account, credit_account = get_account(conn, debit), get_account(conn, credit)
    if debit_account.asset != credit_account.asset:
        raise LedgerError(
            "asset_mismatch", f"{debit} holds {debit_account.asset} and {credit} holds {credit_account.asset}"
        )
    proposal = conn.execute(
        sa.text(
            "INSERT INTO finance_writeoffs (exception_id, debit, credit, asset, amount, reason, proposed_by)"
            f" VALUES (:x, :d, :c, :asset, :amount, :reason, :by) RETURNING {_WRITEOFF_COLUMNS}"
        ),
        {
            "x": row.id,
            "d": debit,
            "c": credit,
            "asset": debit_account.asset,
            "amount": amount,
            "reason": reason,
            "by": actor.actor,
        },
    ).one()
    result = _writeoff_dict(proposal)
    _audit(conn, actor, "writeoff.propose", f"writeoff:{proposal.id}", None, result)
    return result


def decide_writeoff(conn: sa.Connection, writeoff_id: int, *, approve: bool, actor: Actor) -> dict[str, Any]:
    """Approve (book the entry and resolve the exception) or reject a proposed write-off. Only a
    finance user other than the proposer decides; deciding again the same way is a no-op."""
    if isinstance(writeoff_id, bool) or not isinstance(writeoff_id, int) or not 0 < writeoff_id < 2**63:
        raise InvalidInput("write-off id must be a positive integer")
    row = conn.execute(
        sa.text(f"SELECT {_WRITEOFF_COLUMNS} FROM finance_writeoffs WHERE id = :id FOR UPDATE"),
        {"id": writeoff_id},
    ).first()
    if row is None:
        raise NotFound("unknown_writeoff", f"no write-off {writeoff_id}")
    wanted = "approved" if approve else "rejected"
    if row.status != "proposed":
        if row.status == wanted and row.decided_by == actor.actor:
            return _writeoff_dict(row)
        raise Conflict(
            "writeoff_decided", f"write-off {writeoff_id} was already {row.status} by {row.decided_by}"
        )
    if row.proposed_by == actor.actor:
        raise Conflict("four_eyes", "a write-off must be decided by someone other than who proposed it")
    exception = _open_row(conn, int(row.exception_id))
    entry_key: str | None = None
    if approve:
        entry_key = f"writeoff:{row.id}"
        entry = NewEntry(
            key=entry_key,
            legs=(Leg(row.debit, row.credit, int(row.amount), row.asset),),
            kind="finance.write_off",
            metadata={
                "exception": exception.key,
                "reason": row.reason,
                "proposed_by": row.proposed_by,
                "approved_by": actor.actor,
            },
        )
        (result,) = post_batch(conn, [entry])
        if result.status == "rejected":
            raise LedgerError(result.code or "rejected", f"the write-off entry was refused: {result.reason}")
    conn.execute(
        sa.text(
            "UPDATE finance_writeoffs SET status = :s, decided_by = :by, decided_at = now(), entry_key = :k"
            " WHERE id = :id"
        ),
        {"s": wanted, "by": actor.actor, "k": entry_key, "id": row.id},
    )
    if approve:
        conn.execute(
            sa.text(
                "UPDATE finance_exceptions SET status = 'resolved', resolution = 'write_off',"
                " resolved_by = :by, resolved_at = now(), resolution_note = :note,"
                " resolution_entry_key = :k WHERE id = :id"
            ),
            {"by": actor.actor, "note": row.reason, "k": entry_key, "id": exception.id},
        )
    decided = conn.execute(
        sa.text(f"SELECT {_WRITEOFF_COLUMNS} FROM finance_writeoffs WHERE id = :id"), {"id": row.id}
    ).one()
    result_dict = _writeoff_dict(decided)
    _audit(
        conn,
        actor,
        f"writeoff.{'approve' if approve else 'reject'}",
        f"writeoff:{row.id}",
        {"status": "proposed"},
        result_dict,
    )
    return result_dict
