"""Who asked for a write: audit records stored in the same transaction as the write itself."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True, slots=True)
class Actor:
    """The staff member (API key) or system process behind a request."""

    actor: str
    role: str
    request_id: str
    ip: str = ""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    actor: Actor
    action: str
    target: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None


_INSERT = (
    "INSERT INTO audit_log (actor, role, action, target, before, after, request_id, ip)"
    " SELECT * FROM unnest(CAST(:actor AS text[]), CAST(:role AS text[]), CAST(:action AS text[]),"
    " CAST(:target AS text[]), CAST(:before AS jsonb[]), CAST(:after AS jsonb[]),"
    " CAST(:request_id AS text[]), CAST(:ip AS text[]))"
)


def record(conn: sa.Connection, records: Sequence[AuditRecord]) -> None:
    """Append ``records`` to the audit log inside the caller's transaction (one statement)."""
    if not records:
        return

    def dump(value: Mapping[str, Any] | None) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True, default=str)

    conn.execute(
        sa.text(_INSERT),
        {
            "actor": [r.actor.actor for r in records],
            "role": [r.actor.role for r in records],
            "action": [r.action for r in records],
            "target": [r.target for r in records],
            "before": [dump(r.before) for r in records],
            "after": [dump(r.after) for r in records],
            "request_id": [r.actor.request_id for r in records],
            "ip": [r.actor.ip for r in records],
        },
    )
