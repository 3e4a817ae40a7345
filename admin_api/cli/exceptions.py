"""`tracechain exceptions`: the exceptions queue from a shell (the admin API does the same).

Writes are audited under the shell user (``cli:<user>``): a write-off proposed by one user must be
approved by another.
"""

from __future__ import annotations

import click

from admin_api.cli.runtime import app_engine, base_units, cli_actor, emit
from ledger import exceptions_queue as queue
from ledger.settings import Settings


@click.group("exceptions")
def exceptions() -> None:
    """The exceptions queue: list, show, assign, note, match, writeoff, approve, reject."""


@exceptions.command("list")
@click.option("--status", type=click.Choice(["open", "resolved"]))
@click.option("--kind")
@click.option("--assignee")
@click.option("--after", type=click.IntRange(0), help="Continue after this id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.pass_obj
def list_(
    settings: Settings,
    status: str | None,
    kind: str | None,
    assignee: str | None,
    after: int | None,
    limit: int,
) -> None:
    """Exceptions by id, oldest first, with their age; prints a JSON list."""
    with app_engine(settings, pool_size=1) as engine, engine.connect() as conn:
        emit(
            queue.list_exceptions(conn, status=status, kind=kind, assignee=assignee, after=after, limit=limit)
        )


@exceptions.command("show")
@click.argument("exception_id", type=click.IntRange(1))
@click.pass_obj
def show(settings: Settings, exception_id: int) -> None:
    """One exception with its notes and write-offs (JSON)."""
    with app_engine(settings, pool_size=1) as engine, engine.connect() as conn:
        emit(queue.get_exception(conn, exception_id))


@exceptions.command("assign")
@click.argument("exception_id", type=click.IntRange(1))
@click.argument("assignee")
@click.pass_obj
def assign(settings: Settings, exception_id: int, assignee: str) -> None:
    """Give an open exception to ASSIGNEE."""
    with app_engine(settings, pool_size=1) as engine, engine.begin() as conn:
        emit(queue.assign(conn, exception_id, assignee, cli_actor("exception-assign")))


@exceptions.command("note")
@click.argument("exception_id", type=click.IntRange(1))
@click.argument("note")
@click.pass_obj
def note(settings: Settings, exception_id: int, note: str) -> None:
    """Add NOTE to an exception (kept for good)."""
    with app_engine(settings, pool_size=1) as engine, engine.begin() as conn:
        emit(queue.add_note(conn, exception_id, note, cli_actor("exception-note")))


@exceptions.command("match")
@click.argument("exception_id", type=click.IntRange(1))
@click.option("--note", required=True, help="Why the books and the chain agree after all.")
@click.pass_obj
def match(settings: Settings, exception_id: int, note: str) -> None:
    """Resolve an open exception as a manual match."""
    with app_engine(settings, pool_size=1) as engine, engine.begin() as conn:
        emit(queue.resolve_match(conn, exception_id, note, cli_actor("exception-match")))


@exceptions.command("writeoff")
@click.argument("exception_id", type=click.IntRange(1))
@click.option("--debit", required=True, help="Account debited.")
@click.option("--credit", required=True, help="Account credited.")
@click.option("--amount", required=True, callback=base_units, help="Base units.")
@click.option("--reason", required=True)
@click.pass_obj
def writeoff(
    settings: Settings, exception_id: int, debit: str, credit: str, amount: int, reason: str
) -> None:
    """Propose a write-off entry for an open exception; another user approves it."""
    with app_engine(settings, pool_size=1) as engine, engine.begin() as conn:
        emit(
            queue.propose_writeoff(
                conn,
                exception_id,
                debit=debit,
                credit=credit,
                amount=amount,
                reason=reason,
                actor=cli_actor("writeoff-propose"),
            )
        )


@exceptions.command("approve")
@click.argument("writeoff_id", type=click.IntRange(1))
@click.pass_obj
def approve(settings: Settings, writeoff_id: int) -> None:
    """Approve a write-off someone else proposed: books it and resolves the exception."""
    with app_engine(settings, pool_size=1) as engine, engine.begin() as conn:
        emit(queue.decide_writeoff(conn, writeoff_id, approve=True, actor=cli_actor("writeoff-approve")))


@exceptions.command("reject")
@click.argument("writeoff_id", type=click.IntRange(1))
@click.pass_obj
def reject(settings: Settings, writeoff_id: int) -> None:
    """Reject a write-off someone else proposed; the exception stays open."""
    with app_engine(settings, pool_size=1) as engine, engine.begin() as conn:
        emit(queue.decide_writeoff(conn, writeoff_id, approve=False, actor=cli_actor("writeoff-reject")))
