"""Accounts: creation, listing, closing and reopening."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
import sqlalchemy as sa

from admin_api.auth import MANAGE_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import (
    Blueprint,
    StrictSchema,
    json_object,
    ledger_check,
    ledger_state,
    page_limit,
)
from ledger import accounts as ledger_accounts
from ledger import audit
from ledger.audit import AuditRecord
from ledger.commands import ACCOUNT_FLAGS, ACCOUNT_KINDS, check_account_code, check_asset_code
from ledger.errors import NotFound

blp = Blueprint("accounts", __name__, description="Accounts and their balances")

REASON_MAX_CHARS = 500


class AccountInSchema(StrictSchema):
    code = ma.fields.String(required=True, validate=ledger_check(check_account_code))
    asset = ma.fields.String(required=True, validate=ledger_check(check_asset_code))
    kind = ma.fields.String(required=True, validate=ma.validate.OneOf(ACCOUNT_KINDS))
    flags = ma.fields.List(
        ma.fields.String(validate=ma.validate.OneOf(ACCOUNT_FLAGS)),
        load_default=list,
        validate=ma.validate.Length(max=len(ACCOUNT_FLAGS)),
    )
    metadata = json_object()


class AccountSchema(ma.Schema):
    code = ma.fields.String()
    asset = ma.fields.String()
    kind = ma.fields.String()
    flags = ma.fields.List(ma.fields.String())
    balance = ma.fields.String(metadata={"description": "Posted balance on the normal side (base units)"})
    debits_posted = ma.fields.String()
    credits_posted = ma.fields.String()
    debits_pending = ma.fields.String()
    credits_pending = ma.fields.String()
    metadata = ma.fields.Dict()


class AccountPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(AccountSchema))
    next = ma.fields.String(allow_none=True, metadata={"description": "Cursor of the next page (after=)"})


class AccountQuerySchema(StrictSchema):
    limit = page_limit()
    after = ma.fields.String(metadata={"description": "Continue after this account code"})
    asset = ma.fields.String(validate=ledger_check(check_asset_code))
    prefix = ma.fields.String(validate=ma.validate.Length(1, 200))


class ClosingSchema(StrictSchema):
    reason = ma.fields.String(validate=ma.validate.Length(max=REASON_MAX_CHARS))


@blp.route("/accounts", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 409)
@blp.arguments(AccountInSchema)
@blp.response(201, AccountSchema, description="Created")
@blp.alt_response(200, schema=AccountSchema, description="The same account already existed")
def create_account(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Create an account.

    The same definition again answers 200; a different one is 409 account_conflict; an
    unknown asset is 404 unknown_asset.
    """
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        account, status = ledger_accounts.create_account(
            conn, body["code"], body["asset"], body["kind"], body["flags"], body.get("metadata") or {}
        )
        if status == "created":
            audit.record(
                conn,
                [AuditRecord(actor, "account.create", f"account:{account.code}", None, account.as_dict())],
            )
    return account.as_dict(), 201 if status == "created" else 200


@blp.route("/accounts", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(AccountQuerySchema, location="query")
@blp.response(200, AccountPageSchema)
def list_accounts(query: dict[str, Any]) -> dict[str, Any]:
    """Accounts by code, a page at a time (pass `next` back as `after`)."""
    limit: int = query["limit"]
    with ledger_state().engine.connect() as conn:
        found = ledger_accounts.list_accounts(
            conn,
            after_code=query.get("after"),
            asset=query.get("asset"),
            prefix=query.get("prefix"),
            limit=limit + 1,
        )
    page = found[:limit]
    return {
        "items": [a.as_dict() for a in page],
        "next": page[-1].code if len(found) > limit else None,
    }


@blp.route("/accounts/<path:code>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200, AccountSchema)
def get_account(code: str) -> dict[str, Any]:
    """One account with its balances."""
    with ledger_state().engine.connect() as conn:
        return ledger_accounts.get_account(conn, code).as_dict()


def _set_closed(code: str, closed: bool, reason: str | None) -> dict[str, Any]:
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        # Lock first so that two concurrent closes audit one change, not two.
        locked = conn.execute(
            sa.text("SELECT closed FROM ledger_accounts WHERE code = :code FOR UPDATE"), {"code": code}
        ).first()
        if locked is None:
            raise NotFound("unknown_account", f"account {code!r} does not exist")
        before = ledger_accounts.get_account(conn, code)
        if ("closed" in before.flags) == closed:
            return before.as_dict()
        after = ledger_accounts.set_closed(conn, code, closed)
        after_doc = after.as_dict()
        if reason:
            after_doc["reason"] = reason
        audit.record(
            conn,
            [
                AuditRecord(
                    actor,
                    "account.close" if closed else "account.reopen",
                    f"account:{code}",
                    before.as_dict(),
                    after_doc,
                )
            ],
        )
        return after.as_dict()


@blp.route("/accounts/<path:code>/close", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 409)
@blp.arguments(ClosingSchema, required=False)
@blp.response(200, AccountSchema)
def close_account(body: dict[str, Any], code: str) -> dict[str, Any]:
    """Close an account: no new transfers touch it. Refused (409 open_holds) while it has holds."""
    return _set_closed(code, True, body.get("reason"))


@blp.route("/accounts/<path:code>/reopen", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404)
@blp.arguments(ClosingSchema, required=False)
@blp.response(200, AccountSchema)
def reopen_account(body: dict[str, Any], code: str) -> dict[str, Any]:
    """Reopen a closed account."""
    return _set_closed(code, False, body.get("reason"))
