"""The exceptions queue: every break finance must look at, and its resolution (DESIGN §10).

Staff read the queue; finance assigns, notes and resolves (a manual match, or a write-off that a
second finance user approves). Every write is audited.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from admin_api.auth import MANAGE_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.resources import BaseUnits, Blueprint, StrictSchema, id_cursor, ledger_state, page_limit
from ledger import exceptions_queue as queue

blp = Blueprint("exceptions", __name__, description="The exceptions queue and its resolutions")


def _text(limit: int) -> ma.fields.String:
    return ma.fields.String(required=True, validate=ma.validate.Length(1, limit))


class ExceptionQuerySchema(StrictSchema):
    limit = page_limit()
    after = id_cursor()
    status = ma.fields.String(validate=ma.validate.OneOf(["open", "resolved"]))
    kind = ma.fields.String(validate=ma.validate.Length(1, 64))
    assignee = ma.fields.String(validate=ma.validate.Length(1, queue.NAME_MAX_CHARS))


class AssignSchema(StrictSchema):
    assignee = _text(queue.NAME_MAX_CHARS)


class NoteSchema(StrictSchema):
    note = _text(queue.NOTE_MAX_CHARS)


class WriteoffRequestSchema(StrictSchema):
    debit = _text(200)
    credit = _text(200)
    amount = BaseUnits(required=True)
    reason = _text(queue.NOTE_MAX_CHARS)


class NoteOutSchema(ma.Schema):
    id = ma.fields.Integer()
    author = ma.fields.String()
    note = ma.fields.String()
    at = ma.fields.String()


class WriteoffSchema(ma.Schema):
    id = ma.fields.Integer()
    exception_id = ma.fields.Integer()
    debit = ma.fields.String()
    credit = ma.fields.String()
    asset = ma.fields.String()
    amount = ma.fields.String()
    reason = ma.fields.String()
    proposed_by = ma.fields.String()
    proposed_at = ma.fields.String()
    status = ma.fields.String()
    decided_by = ma.fields.String(allow_none=True)
    decided_at = ma.fields.String(allow_none=True)
    entry_key = ma.fields.String(allow_none=True)


class ExceptionSchema(ma.Schema):
    id = ma.fields.Integer()
    key = ma.fields.String()
    kind = ma.fields.String()
    chain_id = ma.fields.Integer(allow_none=True)
    tx_hash = ma.fields.String(allow_none=True)
    log_index = ma.fields.Integer(allow_none=True)
    entry_key = ma.fields.String(allow_none=True)
    details = ma.fields.Dict()
    status = ma.fields.String()
    created_at = ma.fields.String()
    age_s = ma.fields.Integer(metadata={"description": "Seconds open (until resolved)"})
    assignee = ma.fields.String(allow_none=True)
    resolution = ma.fields.String(allow_none=True)
    resolved_by = ma.fields.String(allow_none=True)
    resolved_at = ma.fields.String(allow_none=True)
    resolution_note = ma.fields.String(allow_none=True)
    resolution_entry_key = ma.fields.String(allow_none=True)


class ExceptionDetailSchema(ExceptionSchema):
    notes = ma.fields.List(ma.fields.Nested(NoteOutSchema))
    writeoffs = ma.fields.List(ma.fields.Nested(WriteoffSchema))


class ExceptionPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(ExceptionSchema))
    next = ma.fields.Integer(allow_none=True, metadata={"description": "Cursor of the next page (after=)"})


@blp.route("/exceptions", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(ExceptionQuerySchema, location="query")
@blp.response(200, ExceptionPageSchema)
def list_exceptions(query: dict[str, Any]) -> dict[str, Any]:
    """The queue by id (oldest first), with age; filter by status, kind and assignee."""
    limit: int = query.pop("limit")
    with ledger_state().engine.connect() as conn:
        rows = queue.list_exceptions(conn, limit=limit + 1, **query)
    page = rows[:limit]
    return {"items": page, "next": page[-1]["id"] if len(rows) > limit else None}


@blp.route("/exceptions/<int:exception_id>", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.response(200, ExceptionDetailSchema)
def get_exception(exception_id: int) -> dict[str, Any]:
    """One exception with its notes and write-off proposals."""
    with ledger_state().engine.connect() as conn:
        return queue.get_exception(conn, exception_id)


@blp.route("/exceptions/<int:exception_id>/assign", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.arguments(AssignSchema)
@blp.response(200, ExceptionDetailSchema)
def assign(body: dict[str, Any], exception_id: int) -> dict[str, Any]:
    """Give an open exception to someone."""
    with ledger_state().engine.begin() as conn:
        return queue.assign(conn, exception_id, body["assignee"], current_actor())


@blp.route("/exceptions/<int:exception_id>/notes", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.arguments(NoteSchema)
@blp.response(201, ExceptionDetailSchema)
def add_note(body: dict[str, Any], exception_id: int) -> dict[str, Any]:
    """Add a note (kept for good)."""
    with ledger_state().engine.begin() as conn:
        return queue.add_note(conn, exception_id, body["note"], current_actor())


@blp.route("/exceptions/<int:exception_id>/match", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.arguments(NoteSchema)
@blp.response(200, ExceptionDetailSchema)
def match(body: dict[str, Any], exception_id: int) -> dict[str, Any]:
    """Resolve as a manual match; the note says why the books and the chain agree."""
    with ledger_state().engine.begin() as conn:
        return queue.resolve_match(conn, exception_id, body["note"], current_actor())


@blp.route("/exceptions/<int:exception_id>/writeoffs", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.arguments(WriteoffRequestSchema)
@blp.response(201, WriteoffSchema)
def propose_writeoff(body: dict[str, Any], exception_id: int) -> dict[str, Any]:
    """Propose the write-off entry (amount from debit to credit); a second finance user approves it."""
    with ledger_state().engine.begin() as conn:
        return queue.propose_writeoff(conn, exception_id, actor=current_actor(), **body)


@blp.route("/writeoffs/<int:writeoff_id>/approve", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.response(200, WriteoffSchema)
def approve_writeoff(writeoff_id: int) -> dict[str, Any]:
    """Approve a proposed write-off (never one's own): books its entry and resolves the exception."""
    with ledger_state().engine.begin() as conn:
        return queue.decide_writeoff(conn, writeoff_id, approve=True, actor=current_actor())


@blp.route("/writeoffs/<int:writeoff_id>/reject", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@blp.response(200, WriteoffSchema)
def reject_writeoff(writeoff_id: int) -> dict[str, Any]:
    """Reject a proposed write-off (never one's own); the exception stays open."""
    with ledger_state().engine.begin() as conn:
        return queue.decide_writeoff(conn, writeoff_id, approve=False, actor=current_actor())
