"""Assets: what accounts are denominated in (code and scale)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from admin_api.auth import MANAGE_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import Blueprint, StrictSchema, ledger_check, ledger_state
from ledger import accounts as ledger_accounts
from ledger import audit
from ledger.audit import AuditRecord
from ledger.commands import check_asset_code

blp = Blueprint("assets", __name__, description="Assets (code, scale)")


class AssetInSchema(StrictSchema):
    code = ma.fields.String(required=True, validate=ledger_check(check_asset_code))
    scale = ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(0, 36))


class AssetSchema(ma.Schema):
    code = ma.fields.String()
    scale = ma.fields.Integer()


class AssetListSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(AssetSchema))


@blp.route("/assets", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(409)
@blp.arguments(AssetInSchema)
@blp.response(201, AssetSchema, description="Created")
@blp.alt_response(200, schema=AssetSchema, description="The same asset already existed")
def create_asset(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Create an asset. The same definition again answers 200; another scale is 409 asset_conflict."""
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        asset, status = ledger_accounts.create_asset(conn, body["code"], body["scale"])
        if status == "created":
            audit.record(
                conn, [AuditRecord(actor, "asset.create", f"asset:{asset.code}", None, asset.as_dict())]
            )
    return asset.as_dict(), 201 if status == "created" else 200


@blp.route("/assets", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.response(200, AssetListSchema)
def list_assets() -> dict[str, Any]:
    """Every asset, by code."""
    with ledger_state().engine.connect() as conn:
        return {"items": [a.as_dict() for a in ledger_accounts.list_assets(conn)]}
