"""Holds (pending transfers): post, void, and the expiry sweep."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import marshmallow as ma

from admin_api.auth import POSTING_ROLES, current_actor, require_roles
from admin_api.errors import Problem, documents_problems
from admin_api.resources import BaseUnits, Blueprint, StrictSchema, json_object, ledger_state
from admin_api.resources.entries import EntrySchema, IdempotencyHeaderSchema, book
from ledger.commands import Resolve
from ledger.errors import InvalidInput
from ledger.expiry import expire_holds

blp = Blueprint("holds", __name__, description="Holds: post (fully or partly), void, expire")

SWEEP_LIMIT_MAX = 100_000


class PostHoldSchema(StrictSchema):
    amount = BaseUnits(metadata={"description": "Base units to post (default: all of the hold)"})
    metadata = json_object()


class VoidHoldSchema(StrictSchema):
    metadata = json_object()


class SweepSchema(StrictSchema):
    limit = ma.fields.Integer(
        strict=True, load_default=SWEEP_LIMIT_MAX, validate=ma.validate.Range(1, SWEEP_LIMIT_MAX)
    )


class SweepResultSchema(ma.Schema):
    created = ma.fields.Integer(metadata={"description": "Holds expired by this sweep"})
    exists = ma.fields.Integer(metadata={"description": "Holds a concurrent sweep expired first"})
    rejected = ma.fields.Integer()


def _resolve(
    headers: dict[str, Any],
    pending_key: str,
    action: Literal["post", "void"],
    *,
    amount: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Resolve:
    try:
        return Resolve(
            headers["idempotency_key"], pending_key, action, amount=amount, metadata=metadata or {}
        )
    except InvalidInput as exc:
        raise Problem.invalid_body(exc.message) from exc


@blp.route("/holds/<path:pending_key>/post", methods=["POST"])
@require_roles(*POSTING_ROLES)
@documents_problems(409, 422)
@blp.arguments(IdempotencyHeaderSchema, location="headers")
@blp.arguments(PostHoldSchema, required=False)
@blp.response(201, EntrySchema, description="Posted")
@blp.alt_response(200, schema=EntrySchema, description="Posted earlier under the same key")
def post_hold(headers: dict[str, Any], body: dict[str, Any], pending_key: str) -> tuple[dict[str, Any], int]:
    """Post the hold booked under `pending_key`: all of it, or `amount` and release the rest.

    422 codes: `unknown_pending`, `not_a_hold`, `pending_already_resolved`, `pending_expired`,
    `exceeds_pending_amount`, `account_closed`; 409 `idempotency_conflict`.
    """
    return book(
        _resolve(headers, pending_key, "post", amount=body.get("amount"), metadata=body.get("metadata"))
    )


@blp.route("/holds/<path:pending_key>/void", methods=["POST"])
@require_roles(*POSTING_ROLES)
@documents_problems(409, 422)
@blp.arguments(IdempotencyHeaderSchema, location="headers")
@blp.arguments(VoidHoldSchema, required=False)
@blp.response(201, EntrySchema, description="Voided")
@blp.alt_response(200, schema=EntrySchema, description="Voided earlier under the same key")
def void_hold(headers: dict[str, Any], body: dict[str, Any], pending_key: str) -> tuple[dict[str, Any], int]:
    """Release the hold booked under `pending_key`.

    422 codes: `unknown_pending`, `not_a_hold`, `pending_already_resolved`, `pending_expired`,
    `account_closed`; 409 `idempotency_conflict`.
    """
    return book(_resolve(headers, pending_key, "void", metadata=body.get("metadata")))


@blp.route("/holds/expire", methods=["POST"])
@require_roles(*POSTING_ROLES)
@blp.arguments(SweepSchema, required=False)
@blp.response(200, SweepResultSchema)
def expire(body: dict[str, Any]) -> dict[str, Any]:
    """Expire every hold whose timeout has passed (at most `limit`); safe to run concurrently."""
    actor = current_actor()
    state = ledger_state()
    results = expire_holds(state.poster, limit=body["limit"], actor=actor)
    state.metrics.observe_results("expire", results)
    counts = Counter(r.status for r in results)
    out = {"created": counts["created"], "exists": counts["exists"], "rejected": counts["rejected"]}
    return out
