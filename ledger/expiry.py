"""The sweep that expires holds whose timeout has passed."""

from __future__ import annotations

import sqlalchemy as sa

from ledger.audit import Actor
from ledger.commands import SYSTEM_KEY_PREFIX, EntryResult, Resolve
from ledger.posting import Poster

SWEEP_BATCH = 1000


def expire_holds(poster: Poster, *, limit: int = 100_000, actor: Actor | None = None) -> list[EntryResult]:
    """Expire every timed-out, unresolved hold (at most ``limit``); safe to run concurrently.

    Each expiry is an entry keyed ``sys:expire:{hold entry id}`` (a prefix callers cannot use),
    so two sweeps racing book it once.
    With ``actor``, each expiry gets an audit record in its own transaction.
    """
    results: list[EntryResult] = []
    while len(results) < limit:
        with poster.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT e.id, e.idempotency_key FROM ledger_transfers p"
                    " JOIN ledger_entries e ON e.id = p.entry_id"
                    " WHERE p.kind = 'pending' AND p.timeout_at <= now()"
                    " AND NOT EXISTS (SELECT 1 FROM ledger_transfers r WHERE r.pending_id = p.id)"
                    " ORDER BY p.timeout_at, p.id LIMIT :n"
                ),
                {"n": min(SWEEP_BATCH, limit - len(results))},
            ).all()
        if not rows:
            break
        commands = [Resolve(f"{SYSTEM_KEY_PREFIX}expire:{eid}", key, "expire") for eid, key in rows]
        batch = poster.post(commands, None if actor is None else [actor] * len(commands))
        results.extend(batch)
        if not any(r.status == "created" for r in batch):
            break  # nothing moved (e.g. a racing sweep took them): do not spin
    return results
