"""Balances as of a time or a block, and statements with running balances."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from admin_api.auth import READ_ROLES, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import BIGINT_MAX, Blueprint, StrictSchema, id_cursor, ledger_state
from ledger import history as ledger_history

blp = Blueprint("history", __name__, description="Balances at a point in time and account statements")


class BalanceQuerySchema(StrictSchema):
    as_of = ma.fields.AwareDateTime(
        format="iso", metadata={"description": "ISO 8601 time with a zone: the books as they stood then"}
    )
    at_block = ma.fields.Integer(
        validate=ma.validate.Range(0, BIGINT_MAX),
        metadata={"description": "Chain block number: chain-referenced entries up to this block"},
    )

    @ma.validates_schema
    def one_point(self, data: dict[str, Any], **_kwargs: Any) -> None:
        if "as_of" in data and "at_block" in data:
            raise ma.ValidationError("give either as_of or at_block, not both", "_schema")


class BalanceSchema(ma.Schema):
    code = ma.fields.String()
    asset = ma.fields.String()
    balance = ma.fields.String()
    debits_posted = ma.fields.String()
    credits_posted = ma.fields.String()
    debits_pending = ma.fields.String()
    credits_pending = ma.fields.String()
    as_of = ma.fields.String()
    at_block = ma.fields.Integer()


class StatementQuerySchema(StrictSchema):
    start = ma.fields.AwareDateTime(
        format="iso", data_key="from", metadata={"description": "From (inclusive)"}
    )
    end = ma.fields.AwareDateTime(format="iso", data_key="to", metadata={"description": "To (exclusive)"})
    after = id_cursor()
    limit = ma.fields.Integer(
        load_default=100, validate=ma.validate.Range(1, ledger_history.STATEMENT_MAX_LINES)
    )


class StatementLineSchema(ma.Schema):
    transfer_id = ma.fields.Integer()
    entry_key = ma.fields.String()
    entry_kind = ma.fields.String()
    transfer_kind = ma.fields.String()
    posted_at = ma.fields.String()
    effective_at = ma.fields.String()
    side = ma.fields.String()
    counterparty = ma.fields.String()
    amount = ma.fields.String()
    balance_after = ma.fields.String()
    debits_pending_after = ma.fields.String()
    credits_pending_after = ma.fields.String()


class StatementSchema(ma.Schema):
    code = ma.fields.String()
    asset = ma.fields.String()
    kind = ma.fields.String()
    opening_balance = ma.fields.String()
    closing_balance = ma.fields.String()
    lines = ma.fields.List(ma.fields.Nested(StatementLineSchema))
    next = ma.fields.Integer(allow_none=True, metadata={"description": "Cursor of the next page (after=)"})


@blp.route("/accounts/<path:code>/balance", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.arguments(BalanceQuerySchema, location="query")
@blp.response(200, BalanceSchema)
def balance(query: dict[str, Any], code: str) -> dict[str, Any]:
    """The balance now, as of a time (`as_of`) or at a chain block (`at_block`)."""
    with ledger_state().engine.connect() as conn:
        return ledger_history.balance(conn, code, as_of=query.get("as_of"), at_block=query.get("at_block"))


@blp.route("/accounts/<path:code>/statement", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.arguments(StatementQuerySchema, location="query")
@blp.response(200, StatementSchema)
def statement(query: dict[str, Any], code: str) -> dict[str, Any]:
    """The account's transfers in [from, to) with running balances, a page at a time."""
    with ledger_state().engine.connect() as conn:
        out = ledger_history.statement(
            conn,
            code,
            start=query.get("start"),
            end=query.get("end"),
            after_id=query.get("after"),
            limit=query["limit"],
        )
    out["next"] = out.pop("next_after_id")
    return out
