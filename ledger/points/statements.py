"""What a participant holds in points, and why: balances, lots and the accrual history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ledger import accounts
from ledger.points import rules

# What each lot still holds: its amount less what expired and what the claims that have not
# failed took from it (a failed claim's mint was voided, so its points are back).
LOT_REMAINING = """
SELECT l.id, l.participant_id, l.amount, l.expired, l.expires_at,
    l.amount - l.expired - COALESCE((
        SELECT sum(cl.amount) FROM points_claim_lots cl
        JOIN points_claims c ON c.id = cl.claim_id
        JOIN chain_outbox o ON o.key = c.outbox_key
        WHERE cl.lot_id = l.id AND o.status <> 'failed'), 0) AS remaining
FROM points_lots l
"""


@dataclass(frozen=True, slots=True)
class Balance:
    participant_id: str
    posted: int  # credits - debits posted on points:{participant}
    held: int  # pending claims
    available: int  # posted - held
    claimable: int  # available, less points of lots past their expiry not yet swept
    next_expiry: datetime | None
    expiring_points: int  # what the lots of next_expiry still hold

    def as_dict(self) -> dict[str, Any]:
        return {
            "participant": self.participant_id,
            "account": f"points:{self.participant_id}",
            "posted": str(self.posted),
            "held": str(self.held),
            "available": str(self.available),
            "claimable": str(self.claimable),
            "next_expiry": self.next_expiry.isoformat() if self.next_expiry else None,
            "expiring_points": str(self.expiring_points),
        }


def balance(conn: sa.Connection, participant_id: str) -> Balance:
    rules.get_participant(conn, participant_id)
    account = accounts.get_account(conn, rules.participant_account(participant_id))
    posted = account.credits_posted - account.debits_posted
    held = account.debits_pending
    row = conn.execute(
        sa.text(
            "WITH l AS (" + LOT_REMAINING + " WHERE l.participant_id = :p)"
            " SELECT COALESCE(sum(remaining) FILTER (WHERE expires_at IS NULL OR expires_at > now()), 0)"
            " AS claimable,"
            " min(expires_at) FILTER (WHERE expires_at > now() AND remaining > 0) AS next_expiry"
            " FROM l"
        ),
        {"p": participant_id},
    ).one()
    expiring = 0
    if row.next_expiry is not None:
        expiring = int(
            conn.execute(
                sa.text(
                    "WITH l AS (" + LOT_REMAINING + " WHERE l.participant_id = :p AND l.expires_at = :e)"
                    " SELECT COALESCE(sum(remaining), 0) FROM l"
                ),
                {"p": participant_id, "e": row.next_expiry},
            ).scalar_one()
        )
    return Balance(participant_id, posted, held, posted - held, int(row.claimable), row.next_expiry, expiring)


@dataclass(frozen=True, slots=True)
class Accrual:
    """One event and how it was scored: the reason for its points."""

    id: int
    source: str
    event_id: str
    event_type: str
    occurred_at: datetime
    rule_id: int
    rule_version: int
    tier: str
    base_points: int
    multiplier_bps: int
    earned: int
    points: int
    capped: bool
    expires_at: datetime | None
    batch_id: int
    received_at: datetime

    @property
    def reason(self) -> str:
        text = (
            f"{self.event_type} v{self.rule_version}: {self.base_points} points"
            f" x {_percent(self.multiplier_bps)}% ({self.tier}) = {self.earned}"
        )
        if self.capped:
            text += f"; daily cap reached, {self.points} credited"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "event_id": self.event_id,
            "type": self.event_type,
            "occurred_at": self.occurred_at.isoformat(),
            "rule_id": self.rule_id,
            "rule_version": self.rule_version,
            "tier": self.tier,
            "base_points": str(self.base_points),
            "multiplier_bps": self.multiplier_bps,
            "earned": str(self.earned),
            "points": str(self.points),
            "capped": self.capped,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "batch_id": self.batch_id,
            "received_at": self.received_at.isoformat(),
            "reason": self.reason,
        }


def history(
    conn: sa.Connection, participant_id: str, *, after: int | None = None, limit: int = 100
) -> list[Accrual]:
    """The participant's accruals, newest first (keyset: ``after`` is the last id seen)."""
    rules.get_participant(conn, participant_id)
    rows = conn.execute(
        sa.text(
            "SELECT e.id, e.source, e.event_id, e.event_type, e.occurred_at, e.rule_id, r.version,"
            " e.tier, e.base_points, e.multiplier_bps, e.earned, e.points, e.capped, e.expires_at,"
            " e.batch_id, e.received_at FROM points_events e JOIN points_rules r ON r.id = e.rule_id"
            " WHERE e.participant_id = :p AND (CAST(:after AS bigint) IS NULL OR e.id < :after)"
            " ORDER BY e.id DESC LIMIT :limit"
        ),
        {"p": participant_id, "after": after, "limit": limit},
    )
    return [
        Accrual(
            r.id, r.source, r.event_id, r.event_type, r.occurred_at, r.rule_id, r.version, r.tier,
            int(r.base_points), r.multiplier_bps, int(r.earned), int(r.points), r.capped, r.expires_at,
            r.batch_id, r.received_at,
        )
        for r in rows
    ]  # fmt: skip


def lots_consistent(conn: sa.Connection, participant_id: str) -> bool:
    """Whether the participant's lots hold exactly what its ledger account has available."""
    b = balance(conn, participant_id)
    held_in_lots = conn.execute(
        sa.text(
            "WITH l AS ("
            + LOT_REMAINING
            + " WHERE l.participant_id = :p) SELECT COALESCE(sum(remaining), 0) FROM l"
        ),
        {"p": participant_id},
    ).scalar_one()
    return int(held_in_lots) == b.available


def _percent(bps: int) -> str:
    """Basis points as a percentage, exactly (15050 -> "150.5"), without a float."""
    whole, part = divmod(bps, 100)
    return str(whole) if part == 0 else f"{whole}.{part:02d}".rstrip("0")
