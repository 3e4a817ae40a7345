"""Reconciliation runs, their reports and the proof of reserves (DESIGN §10).

Finance starts a run on demand (beat starts the scheduled ones); finance, auditors and admins read
runs as JSON or CSV. A run asks the chain node for ``balanceOf`` at the run's block, so these
routes need ``TRACE_RPC_URL`` and the deployment record; without them they answer 503.
"""

from __future__ import annotations

from typing import Any

import flask
import marshmallow as ma
from web3 import Web3

from admin_api.auth import MANAGE_ROLES, current_actor, require_roles
from admin_api.resources import (
    BIGINT_MAX,
    Blueprint,
    ServiceUnavailable,
    StrictSchema,
    ledger_state,
)
from contracts.client import ProviderError
from contracts.deployment import Deployment
from ledger import audit, reconciliation
from ledger.audit import AuditRecord
from workers import reconcile as recon

blp = Blueprint("reconciliation", __name__, description="Reconciliation of the books with the chain")

READERS = ("admin", "finance", "auditor")
_W3_KEY = "tracechain.w3"


def _chain() -> tuple[Deployment, Web3]:
    """The deployment record, then the node: each answers 503 while it is not set up."""
    deployment = ledger_state().deployment()
    return deployment, _w3()


def _w3() -> Web3:
    app = flask.current_app
    w3 = app.extensions.get(_W3_KEY)
    if w3 is None:
        url = ledger_state().settings.rpc_url
        if not url:
            raise ServiceUnavailable(
                "chain_not_configured", "TRACE_RPC_URL is not set; the chain cannot be read"
            )
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
        app.extensions[_W3_KEY] = w3
    return w3


def _block() -> ma.fields.Integer:
    return ma.fields.Integer(validate=ma.validate.Range(0, BIGINT_MAX))


class RunRequestSchema(StrictSchema):
    from_block = _block()
    to_block = _block()


class RunListQuerySchema(StrictSchema):
    limit = ma.fields.Integer(load_default=50, validate=ma.validate.Range(1, 500))
    before = ma.fields.Integer(
        validate=ma.validate.Range(1, BIGINT_MAX),
        metadata={"description": "Continue with runs older than this id (the `next` of the previous page)."},
    )


class RunQuerySchema(StrictSchema):
    format = ma.fields.String(load_default="json", validate=ma.validate.OneOf(["json", "csv"]))
    part = ma.fields.String(
        load_default="summary",
        validate=ma.validate.OneOf(["summary", "breaks", "exceptions"]),
        metadata={"description": "With format=csv: the summary, the breaks, or the open exceptions."},
    )


class ReservesQuerySchema(StrictSchema):
    at_block = _block()


class DriftSchema(ma.Schema):
    ledger = ma.fields.String()
    chain = ma.fields.String()
    drift = ma.fields.String()


class BreakSchema(ma.Schema):
    class_ = ma.fields.String(data_key="class")
    tx_hash = ma.fields.String(allow_none=True)
    log_index = ma.fields.Integer(allow_none=True)
    block_number = ma.fields.Integer(allow_none=True)
    entry_key = ma.fields.String(allow_none=True)
    address = ma.fields.String(allow_none=True)
    chain_amount = ma.fields.String(allow_none=True)
    ledger_amount = ma.fields.String(allow_none=True)
    details = ma.fields.Dict()
    exception_key = ma.fields.String()

    @ma.pre_dump
    def _class(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        return {**data, "class_": data["class"]}


class RunSummarySchema(ma.Schema):
    run_id = ma.fields.Integer()
    chain_id = ma.fields.Integer()
    from_block = ma.fields.Integer()
    to_block = ma.fields.Integer()
    trigger = ma.fields.String()
    requested_by = ma.fields.String()
    ok = ma.fields.Boolean()
    transfers_checked = ma.fields.Integer()
    counts = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer())
    balance_breaks = ma.fields.Integer()
    balances = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Nested(DriftSchema))
    minted = ma.fields.Nested(DriftSchema)
    started_at = ma.fields.String()
    finished_at = ma.fields.String()
    duration_ms = ma.fields.Float()


class RunSchema(RunSummarySchema):
    breaks = ma.fields.List(ma.fields.Nested(BreakSchema))
    break_count = ma.fields.Integer()


class RunPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(RunSummarySchema))
    next = ma.fields.Integer(allow_none=True, metadata={"description": "Cursor of the next page (before=)"})


class ReserveSchema(ma.Schema):
    role = ma.fields.String()
    liabilities = ma.fields.String()
    on_chain = ma.fields.String()
    ledger_mirror = ma.fields.String()
    cover = ma.fields.String()
    covered = ma.fields.Boolean()


class ReservesSchema(ma.Schema):
    chain_id = ma.fields.Integer()
    block = ma.fields.Integer()
    solvent = ma.fields.Boolean()
    addresses = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Nested(ReserveSchema))


@blp.route("/reconciliation/runs", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.arguments(RunRequestSchema)
@blp.response(201, RunSchema)
def start_run(body: dict[str, Any]) -> dict[str, Any]:
    """Reconcile now (by default every block the books have followed) and store the run."""
    state = ledger_state()
    actor = current_actor()
    deployment, w3 = _chain()
    try:
        report = recon.reconcile(
            state.engine,
            w3,
            deployment,
            from_block=body.get("from_block"),
            to_block=body.get("to_block"),
            requested_by=actor.actor,
            unseen_within_s=state.settings.reconcile_unseen_within_s,
        )
    except ProviderError as exc:
        raise ServiceUnavailable("chain_unavailable", f"the chain node failed: {exc}") from exc
    result = report.as_dict()
    with state.engine.begin() as conn:
        summary = {k: v for k, v in result.items() if k not in ("breaks", "balances")}
        audit.record(
            conn, [AuditRecord(actor, "reconciliation.run", f"reconciliation:{report.id}", None, summary)]
        )
    return result


@blp.route("/reconciliation/runs", methods=["GET"])
@require_roles(*READERS)
@blp.arguments(RunListQuerySchema, location="query")
@blp.response(200, RunPageSchema)
def list_runs(query: dict[str, Any]) -> dict[str, Any]:
    """Stored runs, newest first."""
    limit: int = query["limit"]
    with ledger_state().engine.connect() as conn:
        runs = reconciliation.list_runs(conn, before_id=query.get("before"), limit=min(limit + 1, 500))
    page = runs[:limit]
    return {"items": page, "next": page[-1]["run_id"] if len(runs) > limit else None}


@blp.route("/reconciliation/runs/<int:run_id>", methods=["GET"])
@require_roles(*READERS)
@blp.arguments(RunQuerySchema, location="query")
@blp.response(200, RunSchema)
@blp.alt_response(200, description="format=csv: text/csv", content_type="text/csv")
def get_run(query: dict[str, Any], run_id: int) -> Any:
    """One run with its breaks, as JSON, or one part of it as CSV."""
    with ledger_state().engine.connect() as conn:
        run = reconciliation.get_run(conn, run_id)
        exceptions = reconciliation.open_exceptions_report(conn) if query["part"] == "exceptions" else []
    if query["format"] == "json":
        return run
    if query["part"] == "summary":
        text = reconciliation.summary_csv(run)
    elif query["part"] == "breaks":
        text = reconciliation.breaks_csv(run["breaks"])
    else:
        text = reconciliation.exceptions_csv(exceptions)
    return flask.Response(
        text,
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="reconciliation-{run_id}-{query["part"]}.csv"'
        },
    )


@blp.route("/reconciliation/reserves", methods=["GET"])
@require_roles(*READERS)
@blp.arguments(ReservesQuerySchema, location="query")
@blp.response(200, ReservesSchema)
def reserves(query: dict[str, Any]) -> dict[str, Any]:
    """Proof of reserves: per custody address, what the books owe out of it against what it holds on
    chain at the block (default: the last block the books have followed)."""
    state = ledger_state()
    deployment, w3 = _chain()
    try:
        return recon.reserves(state.engine, w3, deployment, query.get("at_block"))
    except ProviderError as exc:
        raise ServiceUnavailable("chain_unavailable", f"the chain node failed: {exc}") from exc
