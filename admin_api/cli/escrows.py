"""`tracechain escrow`: what finance does with escrows from a shell (the admin API does the same).

Writes are audited under the shell user (``cli:<user>``): a split decided by one user must be
approved by another, as through the API.
"""

from __future__ import annotations

from datetime import datetime

import click

from admin_api.cli.runtime import (
    app_engine,
    base_units,
    cli_actor,
    emit,
    emit_line,
    load_deployment,
    parse_timestamp,
)
from ledger import audit
from ledger.audit import AuditRecord
from ledger.escrow import disputes, service
from ledger.escrow.states import STATUSES
from ledger.settings import Settings
from workers import escrow_saga


@click.group("escrow")
def escrow() -> None:
    """Escrows: list, show, history, release, dispute, resolve, approve, sweep."""


@escrow.command("list")
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--party", help="Buyer or seller address.")
@click.option("--deadline-before", callback=parse_timestamp, help="ISO 8601 with a time zone.")
@click.option("--deadline-after", callback=parse_timestamp, help="ISO 8601 with a time zone.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.pass_obj
def list_(
    settings: Settings,
    status: str | None,
    party: str | None,
    deadline_before: datetime | None,
    deadline_after: datetime | None,
    limit: int,
) -> None:
    """One JSON line per escrow, by id."""
    with app_engine(settings) as engine, engine.connect() as conn:
        found = service.list_escrows(
            conn,
            status=status,
            party=party,
            deadline_before=deadline_before,
            deadline_after=deadline_after,
            limit=limit,
        )
    for item in found:
        emit_line(item.as_dict())


@escrow.command("show")
@click.argument("escrow_id")
@click.pass_obj
def show(settings: Settings, escrow_id: str) -> None:
    """The escrow's terms, status and amounts."""
    with app_engine(settings) as engine, engine.connect() as conn:
        emit(service.get_escrow(conn, escrow_id.lower()).as_dict())


@escrow.command("history")
@click.argument("escrow_id")
@click.pass_obj
def history(settings: Settings, escrow_id: str) -> None:
    """Moves, attestations, disputes, resolutions, chain transactions and ledger lines."""
    with app_engine(settings) as engine, engine.connect() as conn:
        emit(disputes.full_history(conn, escrow_id.lower()))


@escrow.command("release")
@click.argument("escrow_id")
@click.option(
    "--amount", callback=base_units, help="Base units of this milestone (default: all that remains)."
)
@click.pass_obj
def release(settings: Settings, escrow_id: str, amount: int | None) -> None:
    """Release a delivery-confirmed escrow (a milestone, or all that remains)."""
    actor = cli_actor("escrow-release")
    deployment = load_deployment(settings)
    with app_engine(settings) as engine, engine.begin() as conn:
        row = escrow_saga.enqueue_release(conn, deployment, escrow_id.lower(), actor.actor, amount)
        audit.record(
            conn, [AuditRecord(actor, "escrow.release", f"escrow:{escrow_id}", None, {"outbox": row.key})]
        )
    emit({"escrow_id": escrow_id.lower(), "outbox": row.key, "status": row.status})


@escrow.command("dispute")
@click.argument("escrow_id")
@click.option("--reason", required=True)
@click.pass_obj
def dispute(settings: Settings, escrow_id: str, reason: str) -> None:
    """Open a dispute as staff: the escrow freezes, its deadline is extended on chain."""
    actor = cli_actor("escrow-dispute")
    deployment = load_deployment(settings)
    with app_engine(settings) as engine, engine.begin() as conn:
        opened, status = escrow_saga.open_dispute(
            conn,
            deployment,
            escrow_id.lower(),
            "staff",
            reason,
            actor.actor,
            settings.escrow_dispute_extension_s,
        )
        if status == "created":
            audit.record(
                conn, [AuditRecord(actor, "escrow.dispute", f"escrow:{escrow_id}", None, opened.as_dict())]
            )
    emit({**opened.as_dict(), "result": status})


@escrow.command("resolve")
@click.argument("escrow_id")
@click.option(
    "--seller", "seller_amount", callback=base_units, required=True, help="Base units to the seller."
)
@click.option(
    "--buyer", "buyer_amount", callback=base_units, required=True, help="Base units back to the buyer."
)
@click.option("--fee", callback=base_units, required=True, help="Base units of fee.")
@click.pass_obj
def resolve(settings: Settings, escrow_id: str, seller_amount: int, buyer_amount: int, fee: int) -> None:
    """Decide a disputed escrow's split; above TRACE_ESCROW_APPROVAL_ABOVE it awaits approval."""
    actor = cli_actor("escrow-resolve")
    deployment = load_deployment(settings)
    with app_engine(settings) as engine, engine.begin() as conn:
        resolution, status = escrow_saga.decide_split(
            conn,
            deployment,
            escrow_id.lower(),
            seller_amount,
            buyer_amount,
            fee,
            actor.actor,
            settings.escrow_approval_above,
        )
        if status == "created":
            audit.record(
                conn,
                [AuditRecord(actor, "escrow.resolve", f"escrow:{escrow_id}", None, resolution.as_dict())],
            )
    emit({**resolution.as_dict(), "result": status})


@escrow.command("approve")
@click.argument("resolution_id", type=click.IntRange(1))
@click.pass_obj
def approve(settings: Settings, resolution_id: int) -> None:
    """Approve a split awaiting approval (not the user who decided it)."""
    actor = cli_actor("escrow-approve")
    deployment = load_deployment(settings)
    with app_engine(settings) as engine, engine.begin() as conn:
        before = disputes.get_resolution(conn, resolution_id).as_dict()
        resolution, status = escrow_saga.approve_split(conn, deployment, resolution_id, actor.actor)
        if status == "created":
            audit.record(
                conn,
                [
                    AuditRecord(
                        actor, "escrow.approve", f"resolution:{resolution_id}", before, resolution.as_dict()
                    )
                ],
            )
    emit({**resolution.as_dict(), "result": status})


@escrow.command("sweep")
@click.pass_obj
def sweep(settings: Settings) -> None:
    """One pass of the deadline sweep (beat runs it every TRACE_ESCROW_SWEEP_INTERVAL_S)."""
    deployment = load_deployment(settings)
    with app_engine(settings) as engine:
        emit(escrow_saga.sweep(engine, deployment).as_dict())
