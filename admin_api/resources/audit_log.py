"""The audit log: who did which staff write, when, from where."""

from __future__ import annotations

import json
from typing import Any

import marshmallow as ma
import sqlalchemy as sa

from admin_api.auth import AUDIT_ROLES, require_roles
from admin_api.resources import Blueprint, StrictSchema, id_cursor, ledger_state, page_limit

blp = Blueprint("audit", __name__, description="The append-only audit log of staff writes")


class AuditQuerySchema(StrictSchema):
    limit = page_limit()
    after = id_cursor()
    actor = ma.fields.String(validate=ma.validate.Length(1, 300))
    action = ma.fields.String(validate=ma.validate.Length(1, 300))
    target = ma.fields.String(validate=ma.validate.Length(1, 300))


class AuditRecordSchema(ma.Schema):
    id = ma.fields.Integer()
    at = ma.fields.DateTime()
    actor = ma.fields.String()
    role = ma.fields.String()
    action = ma.fields.String()
    target = ma.fields.String()
    before = ma.fields.Dict(allow_none=True)
    after = ma.fields.Dict(allow_none=True)
    request_id = ma.fields.String()
    ip = ma.fields.String()


class AuditPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(AuditRecordSchema))
    next = ma.fields.Integer(allow_none=True, metadata={"description": "Cursor of the next page (after=)"})


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@blp.route("/audit", methods=["GET"])
@require_roles(*AUDIT_ROLES)
@blp.arguments(AuditQuerySchema, location="query")
@blp.response(200, AuditPageSchema)
def list_audit(query: dict[str, Any]) -> dict[str, Any]:
    """Audit records by id, a page at a time; filter by actor, action and target (exact)."""
    limit: int = query["limit"]
    where = ["true"]
    params: dict[str, Any] = {"limit": limit + 1}
    for name in ("actor", "action", "target"):
        if name in query:
            where.append(f"{name} = :{name}")
            params[name] = query[name]
    if "after" in query:
        where.append("id > :after")
        params["after"] = query["after"]
    with ledger_state().engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, at, actor, role, action, target, before, after, request_id, ip FROM audit_log"
                " WHERE " + " AND ".join(where) + " ORDER BY id LIMIT :limit"
            ),
            params,
        ).all()
    items = [
        {
            "id": r[0],
            "at": r[1],
            "actor": r[2],
            "role": r[3],
            "action": r[4],
            "target": r[5],
            "before": _json(r[6]),
            "after": _json(r[7]),
            "request_id": r[8],
            "ip": r[9],
        }
        for r in rows[:limit]
    ]
    return {"items": items, "next": items[-1]["id"] if len(rows) > limit else None}
