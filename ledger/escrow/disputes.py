"""Disputes and their split resolutions.

A buyer, a seller (signed) or staff opens a dispute before the release; the escrow freezes
(the deadline sweep leaves it alone, and the chain's deadline is extended so the buyer's own
refund waits). Finance decides a split of what the escrow still holds between the seller, the
buyer and the fee; a split over the configured size waits for a second finance user's approval
(four eyes, enforced by PostgreSQL too). The chain carries it out as one release and one refund.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa

from ledger.accounts import Created
from ledger.errors import Conflict, InvalidInput, NotFound
from ledger.escrow import service
from ledger.escrow.states import check_move
from ledger.history import statement
from ledger.money import UINT256_LIMIT

PARTIES: Final = ("buyer", "seller", "staff")
REASON_MAX_CHARS: Final = 1000


@dataclass(frozen=True, slots=True)
class Dispute:
    id: int
    escrow_id: str
    party: str
    opened_by: str
    reason: str
    opened_at: datetime
    closed_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "escrow_id": self.escrow_id,
            "party": self.party,
            "opened_by": self.opened_by,
            "reason": self.reason,
            "opened_at": self.opened_at.isoformat(),
            "closed_at": None if self.closed_at is None else self.closed_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Resolution:
    id: int
    escrow_id: str
    dispute_id: int
    seller_amount: int
    buyer_amount: int
    fee: int
    decided_by: str
    needs_approval: bool
    approved_by: str | None
    status: str

    @property
    def total(self) -> int:
        return self.seller_amount + self.buyer_amount + self.fee

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "escrow_id": self.escrow_id,
            "dispute_id": self.dispute_id,
            "seller_amount": str(self.seller_amount),
            "buyer_amount": str(self.buyer_amount),
            "fee": str(self.fee),
            "decided_by": self.decided_by,
            "needs_approval": self.needs_approval,
            "approved_by": self.approved_by,
            "status": self.status,
        }


_DISPUTE = "SELECT id, escrow_id, party, opened_by, reason, opened_at, closed_at FROM escrow_disputes"
_RESOLUTION = (
    "SELECT id, escrow_id, dispute_id, seller_amount, buyer_amount, fee, decided_by, needs_approval,"
    " approved_by, status FROM escrow_resolutions"
)


def _dispute(row: Any) -> Dispute:
    return Dispute(row.id, row.escrow_id, row.party, row.opened_by, row.reason, row.opened_at, row.closed_at)


def _resolution(row: Any) -> Resolution:
    return Resolution(
        row.id,
        row.escrow_id,
        row.dispute_id,
        int(row.seller_amount),
        int(row.buyer_amount),
        int(row.fee),
        row.decided_by,
        row.needs_approval,
        row.approved_by,
        row.status,
    )


def open_dispute_of(conn: sa.Connection, escrow_id: str) -> Dispute | None:
    row = conn.execute(
        sa.text(_DISPUTE + " WHERE escrow_id = :e AND closed_at IS NULL"), {"e": escrow_id}
    ).first()
    return None if row is None else _dispute(row)


def disputes_of(conn: sa.Connection, escrow_id: str) -> list[Dispute]:
    rows = conn.execute(sa.text(_DISPUTE + " WHERE escrow_id = :e ORDER BY id"), {"e": escrow_id})
    return [_dispute(r) for r in rows]


def resolutions_of(conn: sa.Connection, escrow_id: str) -> list[Resolution]:
    rows = conn.execute(sa.text(_RESOLUTION + " WHERE escrow_id = :e ORDER BY id"), {"e": escrow_id})
    return [_resolution(r) for r in rows]


def get_resolution(conn: sa.Connection, resolution_id: int, *, for_update: bool = False) -> Resolution:
    row = conn.execute(
        sa.text(_RESOLUTION + " WHERE id = :id" + (" FOR UPDATE" if for_update else "")),
        {"id": resolution_id},
    ).first()
    if row is None:
        raise NotFound("resolution_not_found", f"no resolution {resolution_id}")
    return _resolution(row)


def live_resolution(conn: sa.Connection, escrow_id: str) -> Resolution | None:
    """The escrow's resolution awaiting approval or being carried out, if any."""
    row = conn.execute(
        sa.text(_RESOLUTION + " WHERE escrow_id = :e AND status IN ('awaiting_approval', 'executing')"),
        {"e": escrow_id},
    ).first()
    return None if row is None else _resolution(row)


def check_reason(reason: object) -> str:
    if not isinstance(reason, str) or not 1 <= len(reason.strip()) <= REASON_MAX_CHARS:
        raise InvalidInput(f"a dispute needs a reason of 1 to {REASON_MAX_CHARS} characters")
    if any(not (c.isprintable() or c in "\n\t") for c in reason):
        raise InvalidInput("the reason must be printable text")
    return reason


def open_dispute(
    conn: sa.Connection, escrow_id: str, party: str, reason: str, actor: str
) -> tuple[Dispute, Created]:
    """Open a dispute on the escrow (row locked) and move it to ``disputed``. While one is open,
    another opening reports the open one as ``exists``."""
    if party not in PARTIES:
        raise InvalidInput(f"party must be one of {', '.join(PARTIES)}")
    check_reason(reason)
    escrow = service.get_escrow(conn, escrow_id, for_update=True)
    current = open_dispute_of(conn, escrow_id)
    if current is not None:
        return current, "exists"
    check_move(escrow_id, escrow.status, "disputed")
    row = conn.execute(
        sa.text(
            "INSERT INTO escrow_disputes (escrow_id, party, opened_by, reason) VALUES (:e, :p, :a, :r)"
            " RETURNING id, escrow_id, party, opened_by, reason, opened_at, closed_at"
        ),
        {"e": escrow_id, "p": party, "a": actor, "r": reason},
    ).one()
    service.move(conn, escrow_id, "disputed", actor, {"dispute": row.id, "party": party, "reason": reason})
    return _dispute(row), "created"


def _check_part(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < UINT256_LIMIT:
        raise InvalidInput(f"{name} must be an integer of base units from 0 to 2^256-1")
    return value


def decide_split(
    conn: sa.Connection,
    escrow_id: str,
    seller_amount: int,
    buyer_amount: int,
    fee: int,
    actor: str,
    approval_above: int,
) -> tuple[Resolution, Created]:
    """Finance decides how a disputed escrow's remaining funds split. The parts must add up to
    all it still holds. Over ``approval_above`` it waits for a second finance user; otherwise it
    is ready to carry out at once (status ``executing``; the caller starts the chain side in the
    same transaction). The same decision again reports ``exists``; a different one replaces a
    decision still awaiting approval."""
    parts = {
        "seller_amount": _check_part("seller_amount", seller_amount),
        "buyer_amount": _check_part("buyer_amount", buyer_amount),
        "fee": _check_part("fee", fee),
    }
    escrow = service.get_escrow(conn, escrow_id, for_update=True)
    live = live_resolution(conn, escrow_id)
    if live is not None and (live.seller_amount, live.buyer_amount, live.fee, live.decided_by) == (
        seller_amount,
        buyer_amount,
        fee,
        actor,
    ):
        return live, "exists"
    check_move(escrow_id, escrow.status, "resolving")
    total = sum(parts.values())
    if total != escrow.remaining:
        raise InvalidInput(
            f"the split must add up to the {escrow.remaining} the escrow still holds, not {total}"
        )
    if total == 0:
        raise InvalidInput("the escrow holds nothing to split")
    dispute = open_dispute_of(conn, escrow_id)
    if dispute is None:  # pragma: no cover - a disputed escrow always has an open dispute
        raise Conflict("no_open_dispute", f"escrow {escrow_id} has no open dispute")
    if live is not None:
        conn.execute(
            sa.text("UPDATE escrow_resolutions SET status = 'withdrawn' WHERE id = :id"), {"id": live.id}
        )
    needs_approval = total > approval_above
    row = conn.execute(
        sa.text(
            "INSERT INTO escrow_resolutions (escrow_id, dispute_id, seller_amount, buyer_amount, fee,"
            " decided_by, needs_approval, status) VALUES (:e, :d, :s, :b, :f, :a, :n, :st) RETURNING id"
        ),
        {
            "e": escrow_id,
            "d": dispute.id,
            "s": seller_amount,
            "b": buyer_amount,
            "f": fee,
            "a": actor,
            "n": needs_approval,
            "st": "awaiting_approval" if needs_approval else "executing",
        },
    ).one()
    return get_resolution(conn, int(row.id)), "created"


def approve(conn: sa.Connection, resolution_id: int, actor: str) -> tuple[Resolution, Created]:
    """A second finance user approves a split awaiting approval (never the one who decided it);
    it is then ready to carry out (``executing``). Approving it again reports ``exists``."""
    resolution = get_resolution(conn, resolution_id, for_update=True)
    if resolution.status == "executing" and resolution.approved_by == actor:
        return resolution, "exists"
    if resolution.status != "awaiting_approval":
        raise Conflict(
            "resolution_not_awaiting_approval", f"resolution {resolution_id} is {resolution.status}"
        )
    if resolution.decided_by == actor:
        raise Conflict("four_eyes", "a split must be approved by someone other than who decided it")
    conn.execute(
        sa.text(
            "UPDATE escrow_resolutions SET status = 'executing', approved_by = :a, approved_at = now()"
            " WHERE id = :id"
        ),
        {"a": actor, "id": resolution_id},
    )
    return get_resolution(conn, resolution_id), "created"


def full_history(conn: sa.Connection, escrow_id: str, ledger_lines: int = 500) -> dict[str, Any]:
    """Everything that happened to an escrow: its moves, attestations, disputes and resolutions,
    the chain actions taken for it and the ledger lines of its account."""
    escrow = service.get_escrow(conn, escrow_id)
    attestations = conn.execute(
        sa.text(
            "SELECT attestor_id, received_at FROM escrow_attestations WHERE escrow_id = :e"
            " ORDER BY received_at"
        ),
        {"e": escrow_id},
    ).all()
    chain_txs = conn.execute(
        sa.text(
            "SELECT key, action, status, nonce, tx_hash, block_number, error, created_at, updated_at"
            " FROM chain_outbox WHERE metadata->>'escrow_id' = :e ORDER BY id"
        ),
        {"e": escrow_id},
    ).mappings()
    return {
        "escrow": escrow.as_dict(),
        "moves": [{**move, "at": move["at"].isoformat()} for move in service.history(conn, escrow_id)],
        "attestations": [
            {"attestor_id": r.attestor_id, "received_at": r.received_at.isoformat()} for r in attestations
        ],
        "disputes": [d.as_dict() for d in disputes_of(conn, escrow_id)],
        "resolutions": [r.as_dict() for r in resolutions_of(conn, escrow_id)],
        "chain_txs": [
            {
                **{k: v for k, v in tx.items() if k not in ("created_at", "updated_at")},
                "created_at": tx["created_at"].isoformat(),
                "updated_at": tx["updated_at"].isoformat(),
            }
            for tx in chain_txs
        ],
        "ledger": statement(conn, service.escrow_account(escrow_id), limit=ledger_lines),
    }
