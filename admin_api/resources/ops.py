"""Liveness, readiness and metrics: anonymous, for load balancers and Prometheus."""

from __future__ import annotations

from typing import Any

import flask
import marshmallow as ma
import structlog

from admin_api.errors import Problem, documents_problems
from admin_api.resources import Blueprint, ledger_state
from ledger.db import current_revision, head_revision

blp = Blueprint("ops", __name__, description="Health, readiness and metrics (no key needed)")
log = structlog.get_logger(__name__)


class HealthSchema(ma.Schema):
    status = ma.fields.String()


class ReadySchema(ma.Schema):
    status = ma.fields.String()
    revision = ma.fields.String()


@blp.route("/healthz", methods=["GET"])
@blp.response(200, HealthSchema)
def healthz() -> dict[str, Any]:
    """The process is up."""
    return {"status": "ok"}


@blp.route("/readyz", methods=["GET"])
@documents_problems(503)
@blp.response(200, ReadySchema)
def readyz() -> dict[str, Any]:
    """The database answers and is migrated to the revision this code needs (503 otherwise)."""
    head = head_revision()
    try:
        with ledger_state().engine.connect() as conn:
            revision = current_revision(conn)
    except Exception as exc:  # any failure to reach the database means "not ready"
        log.warning("readyz.database_unreachable", error=type(exc).__name__)
        raise Problem(503, "not_ready", "the database does not answer") from exc
    if revision != head:
        raise Problem(503, "not_ready", f"the database is at revision {revision!r}, the code needs {head!r}")
    return {"status": "ready", "revision": revision}


@blp.route("/metrics", methods=["GET"])
@blp.doc(
    responses={
        "200": {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
)
def metrics() -> flask.Response:
    """Request counts and latencies, ledger entries created and rejected (Prometheus)."""
    state = ledger_state()
    return flask.Response(state.metrics.render(), content_type=state.metrics.content_type)
