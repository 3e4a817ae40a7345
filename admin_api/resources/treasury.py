"""The treasury wallet's top-ups: TRACE minted into it through the sender (admin only, audited).

The treasury pays staking rewards; a top-up is how it comes to hold TRACE the books explain
(see ``ledger.treasury``).
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from admin_api.auth import READ_ROLES, current_actor, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import BaseUnits, Blueprint, StrictSchema, ledger_state
from ledger import audit, treasury
from ledger.audit import AuditRecord

blp = Blueprint("treasury", __name__, description="The treasury wallet: TRACE minted into it")

MINT_ROLES = ("admin",)


class TopUpInSchema(StrictSchema):
    key = ma.fields.String(
        required=True,
        validate=ma.validate.Length(1, 200),
        metadata={"description": "The caller's idempotency key"},
    )
    amount = BaseUnits(required=True)


class TopUpSchema(ma.Schema):
    key = ma.fields.String()
    chain_id = ma.fields.Integer()
    treasury = ma.fields.String()
    amount = ma.fields.String(metadata={"description": "Base units"})
    status = ma.fields.String(metadata={"description": "pending, minted or failed"})
    outbox_status = ma.fields.String()
    tx_hash = ma.fields.String(allow_none=True)
    created_at = ma.fields.String()


@blp.route("/treasury/mints", methods=["POST"])
@require_roles(*MINT_ROLES)
@documents_problems(409, 503)
@blp.arguments(TopUpInSchema)
@blp.response(201, TopUpSchema, description="Held and queued: the sender mints it")
@blp.alt_response(200, schema=TopUpSchema, description="The same top-up under the same key again")
def mint(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Mint `amount` base units of TRACE into the treasury wallet (`clearing:outbox:{chain}` →
    `treasury:issued:{chain}` held, posted when the mint is confirmed). The same `key` for
    another amount is 409 `idempotency_conflict`."""
    actor = current_actor()
    deployment = ledger_state().deployment()
    with ledger_state().engine.begin() as conn:
        top_up, status = treasury.mint(
            conn,
            deployment.chain_id,
            deployment.token,
            deployment.treasury,
            body["amount"],
            key=body["key"],
        )
        out = top_up.as_dict()
        if status == "created":
            audit.record(
                conn, [AuditRecord(actor, "treasury.mint", f"treasury:mint:{top_up.key}", None, out)]
            )
    return out, 201 if status == "created" else 200


@blp.route("/treasury/mints/<path:key>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200, TopUpSchema)
def get_mint(key: str) -> dict[str, Any]:
    """A top-up and where its mint stands."""
    with ledger_state().engine.connect() as conn:
        return treasury.get(conn, key).as_dict()
