"""``tracechain ledger``: import and export, balances, statements, the check, hold expiry."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

import click
import sqlalchemy as sa
import structlog

from admin_api.cli.runtime import app_engine, cli_actor, emit, emit_line, parse_timestamp
from ledger import history
from ledger.accounts import get_asset
from ledger.check import check_ledger
from ledger.expiry import expire_holds
from ledger.jsonl import export_lines, import_lines, read_lines
from ledger.money import to_display
from ledger.posting import Poster
from ledger.settings import Settings

log = structlog.get_logger(__name__)


@click.group("ledger")
def ledger() -> None:
    """The books: import/export, balances, statements, check, expiry."""


def _snapshot(conn: sa.Connection) -> sa.Connection:
    """One consistent, read-only view of a ledger others may be writing to."""
    return conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)


@ledger.command("import")
@click.argument("source", type=click.File("rb"))
@click.option("--quiet", "-q", is_flag=True, help="Print only rejected lines and the summary.")
@click.pass_context
def import_(ctx: click.Context, source: BinaryIO, quiet: bool) -> None:
    """Book a JSON Lines file (- reads stdin); one result line per input line, then a summary.

    A rejected line writes nothing and the others go on; running the same file again creates
    nothing new. Exits 1 when a line was rejected.
    """
    settings: Settings = ctx.obj
    counts: Counter[str] = Counter({"created": 0, "exists": 0, "rejected": 0})
    with app_engine(settings) as engine:
        results = import_lines(
            engine,
            read_lines(source),
            batch_max=settings.engine_batch_max,
            actor=cli_actor("import"),
        )
        for result in results:
            counts[result["status"]] += 1
            if not quiet or result["status"] == "rejected":
                emit_line(result)
    summary = {"created": counts["created"], "exists": counts["exists"], "rejected": counts["rejected"]}
    log.info("ledger.imported", **summary)
    emit_line({"summary": summary})
    if counts["rejected"]:
        ctx.exit(1)


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    """stdout, or a file that appears complete or not at all."""
    if path is None:
        yield sys.stdout
        return
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


@ledger.command("export")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write to this file instead of stdout.",
)
@click.pass_obj
def export(settings: Settings, output: Path | None) -> None:
    """Write the whole ledger as JSON Lines that `ledger import` books again.

    Importing it into an empty database reproduces every balance.
    """
    lines = 0
    with (
        app_engine(settings) as engine,
        engine.connect() as conn,
        _snapshot(conn).begin(),
        _output(output) as out,
    ):
        for line in export_lines(conn):
            out.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")
            lines += 1
    log.info("ledger.exported", lines=lines, output=str(output) if output else "-")
    if output is not None:
        emit({"output": str(output), "lines": lines})


@ledger.command("balance")
@click.argument("code")
@click.option(
    "--as-of",
    metavar="TIMESTAMP",
    callback=parse_timestamp,
    help="Balance as booked at this time (ISO 8601 with zone).",
)
@click.option(
    "--at-block",
    type=click.IntRange(min=0),
    help="Balance from chain-referenced entries up to this block.",
)
@click.pass_obj
def balance(settings: Settings, code: str, as_of: datetime | None, at_block: int | None) -> None:
    """Print the balance of account CODE: now, as of a time, or at a block."""
    if as_of is not None and at_block is not None:
        raise click.UsageError("give --as-of or --at-block, not both")
    with app_engine(settings) as engine, engine.connect() as conn:
        emit(history.balance(conn, code, as_of=as_of, at_block=at_block))


@ledger.command("statement")
@click.argument("code")
@click.option(
    "--from",
    "start",
    metavar="TIMESTAMP",
    callback=parse_timestamp,
    help="First booking time included (ISO 8601).",
)
@click.option(
    "--to",
    "end",
    metavar="TIMESTAMP",
    callback=parse_timestamp,
    help="Booking time where the statement stops (excluded).",
)
@click.option("--after-id", type=click.IntRange(min=0), help="Continue after this transfer id.")
@click.option(
    "--limit",
    type=click.IntRange(1, history.STATEMENT_MAX_LINES),
    default=100,
    show_default=True,
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["json", "table"]),
    default="json",
    show_default=True,
)
@click.pass_obj
def statement(
    settings: Settings,
    code: str,
    start: datetime | None,
    end: datetime | None,
    after_id: int | None,
    limit: int,
    output_format: str,
) -> None:
    """Print the transfers of account CODE with running balances."""
    if start is not None and end is not None and end <= start:
        raise click.UsageError("--to must be after --from")
    with app_engine(settings) as engine, engine.connect() as conn, _snapshot(conn).begin():
        report = history.statement(conn, code, start=start, end=end, after_id=after_id, limit=limit)
        scale = get_asset(conn, report["asset"]).scale
    if output_format == "json":
        emit(report)
    else:
        _print_statement(report, scale)


def _print_statement(report: dict[str, Any], scale: int) -> None:
    from rich.console import Console
    from rich.table import Table

    def amount(text: str) -> str:
        return to_display(int(text), scale)

    table = Table(
        title=f"Statement of {report['code']} ({report['kind']}, {report['asset']})",
        caption=(
            f"opening {amount(report['opening_balance'])}  closing {amount(report['closing_balance'])}"
            + (f"  more after --after-id {report['next_after_id']}" if report["next_after_id"] else "")
        ),
    )
    for name in ("transfer", "posted at", "entry", "kind", "counterparty"):
        table.add_column(name)
    for name in ("debit", "credit", "balance"):
        table.add_column(name, justify="right")
    for line in report["lines"]:
        shown = amount(line["amount"])
        table.add_row(
            str(line["transfer_id"]),
            line["posted_at"],
            line["entry_key"],
            line["transfer_kind"],
            line["counterparty"],
            shown if line["side"] == "debit" else "",
            shown if line["side"] == "credit" else "",
            amount(line["balance_after"]),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped: wide enough that keys and amounts are not cut
    console.print(table)


@ledger.command("check")
@click.pass_context
def check(ctx: click.Context) -> None:
    """Recompute every balance from the transfers; exits 1 when anything does not hold."""
    settings: Settings = ctx.obj
    with app_engine(settings) as engine, engine.connect() as conn, _snapshot(conn).begin():
        report = check_ledger(conn)
    emit(report)
    if not report["ok"]:
        log.warning("ledger.check_failed", break_count=report["break_count"])
        ctx.exit(1)


@ledger.command("expire")
@click.option("--limit", type=click.IntRange(1, 10_000_000), default=100_000, show_default=True)
@click.pass_context
def expire(ctx: click.Context, limit: int) -> None:
    """Release every hold whose timeout has passed; prints the counts."""
    settings: Settings = ctx.obj
    with app_engine(settings) as engine:
        results = expire_holds(Poster(engine), limit=limit)
    counts = Counter(r.status for r in results)
    rejected = [r.as_dict() for r in results if r.status == "rejected"]
    emit(
        {
            "expired": counts["created"],
            "exists": counts["exists"],
            "rejected": counts["rejected"],
            "rejections": rejected[:50],
        }
    )
    if rejected:
        ctx.exit(1)
