"""The expiry sweep: the unspent remainder of every lot past its expiry goes back to
``points:issued`` under the key ``points:expire:<lot>`` (run by beat and by the CLI).

Idempotent and safe alongside claims: lots are locked in id order (claims lock theirs in the
same order), and a lot's remainder is recomputed under the lock. A lot whose points came back
from a failed claim after it expired is swept again, under ``points:expire:<lot>:<n>``; a lot
with no claim pending on it is settled, so the sweep only ever reads lots that can still change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ledger.commands import Leg, NewEntry
from ledger.engine import post_batch
from ledger.errors import LedgerError
from ledger.points import rules
from ledger.points.statements import LOT_REMAINING

SWEEP_MAX_LOTS = 5_000


@dataclass(slots=True)
class ExpiryReport:
    lots: int = 0  # lots whose remainder was expired
    points: int = 0
    examined: int = 0  # lots past their expiry looked at
    last_lot: int = 0  # where the next call continues (``after``)

    def as_dict(self) -> dict[str, Any]:
        return {"lots": self.lots, "points": str(self.points), "examined": self.examined}


def expiry_key(lot_id: int, seq: int) -> str:
    return f"points:expire:{lot_id}" if seq == 0 else f"points:expire:{lot_id}:{seq}"


_PENDING_CLAIM = (
    "EXISTS (SELECT 1 FROM points_claim_lots cl JOIN points_claims c ON c.id = cl.claim_id"
    " JOIN chain_outbox o ON o.key = c.outbox_key"
    " WHERE cl.lot_id = l.id AND o.status NOT IN ('confirmed', 'failed'))"
)


def expire_points(conn: sa.Connection, *, after: int = 0, limit: int = SWEEP_MAX_LOTS) -> ExpiryReport:
    """Sweep up to ``limit`` unsettled lots past their expiry, of ids above ``after``, in the
    caller's transaction. Each lot's unspent remainder goes back to ``points:issued``; a lot with
    no claim still pending on it is then settled and never looked at again (a pending claim that
    fails later gives its points back to the lot, which the next sweep takes). Call again with
    ``after=report.last_lot`` while ``report.examined == limit``."""
    report = ExpiryReport(last_lot=after)
    due = (
        conn.execute(
            sa.text(
                "SELECT id FROM points_lots WHERE expires_at IS NOT NULL AND NOT settled AND id > :after"
                " AND expires_at <= now() ORDER BY id LIMIT :n FOR UPDATE"
            ),
            {"after": after, "n": limit},
        )
        .scalars()
        .all()
    )
    if not due:
        return report
    report.examined = len(due)
    report.last_lot = int(due[-1])
    lots = conn.execute(
        sa.text(
            "WITH l AS (" + LOT_REMAINING + " WHERE l.id = ANY(:ids))"
            " SELECT l.id, l.participant_id, l.remaining, l.expires_at,"
            " (SELECT count(*) FROM points_expiries x WHERE x.lot_id = l.id) AS seq, "
            + _PENDING_CLAIM
            + " AS claim_pending FROM l ORDER BY l.id"
        ),
        {"ids": list(due)},
    ).all()
    rows = [r for r in lots if r.remaining > 0]
    settled = [r.id for r in lots if not r.claim_pending]
    if rows:
        _expire(conn, rows)
    if settled:
        conn.execute(sa.text("UPDATE points_lots SET settled = true WHERE id = ANY(:ids)"), {"ids": settled})
    report.lots = len(rows)
    report.points = sum(int(r.remaining) for r in rows)
    return report


def _expire(conn: sa.Connection, rows: list[Any]) -> None:
    commands = [
        NewEntry(
            key=expiry_key(r.id, int(r.seq)),
            kind="points.expiry",
            legs=(Leg(f"points:{r.participant_id}", rules.ISSUED, int(r.remaining), rules.ASSET),),
            metadata={"lot": r.id, "expires_at": r.expires_at.isoformat()},
        )
        for r in rows
    ]
    for command, result in zip(commands, post_batch(conn, commands), strict=True):
        if result.status != "created":
            raise LedgerError(
                result.code or "booking_refused", f"{command.key}: {result.reason or result.status}"
            )
    conn.execute(
        sa.text(
            "INSERT INTO points_expiries (lot_id, seq, amount, entry_key)"
            " SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:seq AS int[]), CAST(:amt AS numeric[]),"
            " CAST(:keys AS text[]))"
        ),
        {
            "ids": [r.id for r in rows],
            "seq": [int(r.seq) for r in rows],
            "amt": [int(r.remaining) for r in rows],
            "keys": [c.key for c in commands],
        },
    )
    conn.execute(
        sa.text(
            "UPDATE points_lots l SET expired = l.expired + u.amount"
            " FROM unnest(CAST(:ids AS bigint[]), CAST(:amt AS numeric[])) AS u(id, amount) WHERE l.id = u.id"
        ),
        {"ids": [r.id for r in rows], "amt": [int(r.remaining) for r in rows]},
    )
