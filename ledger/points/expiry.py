"""The expiry sweep: the unspent remainder of every lot past its expiry goes back to
``points:issued`` under the key ``points:expire:<lot>`` (run by beat and by the CLI).

Idempotent and safe alongside claims: lots are locked in id order (claims lock theirs in the
same order), and a lot's remainder is recomputed under the lock. A lot whose points came back
from a failed claim after it expired is swept again, under ``points:expire:<lot>:<n>``.
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
    lots: int = 0
    points: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"lots": self.lots, "points": str(self.points)}


def expiry_key(lot_id: int, seq: int) -> str:
    return f"points:expire:{lot_id}" if seq == 0 else f"points:expire:{lot_id}:{seq}"


def expire_points(conn: sa.Connection, *, limit: int = SWEEP_MAX_LOTS) -> ExpiryReport:
    """Expire up to ``limit`` lots in the caller's transaction; call again while it reports some."""
    report = ExpiryReport()
    due = (
        conn.execute(
            sa.text(
                "WITH l AS (" + LOT_REMAINING + " WHERE l.expires_at <= now() AND l.expired < l.amount)"
                " SELECT id FROM l WHERE remaining > 0 ORDER BY id LIMIT :n"
            ),
            {"n": limit},
        )
        .scalars()
        .all()
    )
    if not due:
        return report
    conn.execute(
        sa.text("SELECT id FROM points_lots WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"), {"ids": list(due)}
    )
    rows = conn.execute(
        sa.text(
            "WITH l AS (" + LOT_REMAINING + " WHERE l.id = ANY(:ids))"
            " SELECT l.id, l.participant_id, l.remaining, l.expires_at,"
            " (SELECT count(*) FROM points_expiries x WHERE x.lot_id = l.id) AS seq"
            " FROM l WHERE l.remaining > 0 ORDER BY l.id"
        ),
        {"ids": list(due)},
    ).all()
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
    report.lots = len(rows)
    report.points = sum(int(r.remaining) for r in rows)
    return report
