"""`tracechain reconcile`: prove that the books match the chain at a block, from a shell.

``tracechain reconcile`` runs and stores a reconciliation (exit 1 when it found a break);
``report`` prints a stored run as JSON or CSV; ``reserves`` prints the proof of reserves.
"""

from __future__ import annotations

from typing import Any

import click

from admin_api.cli.runtime import Failed, app_engine, chain_node, cli_actor, emit, load_deployment
from contracts.client import ProviderError
from ledger import reconciliation
from ledger.settings import Settings
from workers import reconcile as recon


@click.group("reconcile", invoke_without_command=True)
@click.option("--from-block", type=click.IntRange(0), help="First block (default: the deployment's start).")
@click.option(
    "--to-block", type=click.IntRange(0), help="Last block (default: the last one the books followed)."
)
@click.pass_context
def reconcile(ctx: click.Context, from_block: int | None, to_block: int | None) -> None:
    """Reconcile the books with the chain and store the run; prints the run as JSON.

    Exit 0 when nothing differs, 1 when a break was found (each is raised in the exceptions queue).
    """
    if ctx.invoked_subcommand is not None:
        if from_block is not None or to_block is not None:
            raise click.UsageError(
                "--from-block and --to-block belong to the run itself, not to a subcommand"
            )
        return
    settings: Settings = ctx.obj
    deployment = load_deployment(settings)
    w3 = chain_node(settings)
    with app_engine(settings, pool_size=1) as engine:
        try:
            report = recon.reconcile(
                engine,
                w3,
                deployment,
                from_block=from_block,
                to_block=to_block,
                requested_by=cli_actor("reconcile").actor,
                unseen_within_s=settings.reconcile_unseen_within_s,
            )
        except ProviderError as exc:
            raise Failed(f"the chain node failed: {exc}") from exc
    emit(report.as_dict())
    if not report.ok:
        raise Failed(f"reconciliation run {report.id} found {len(report.breaks)} break(s)")


@reconcile.command("report")
@click.option("--run", "run_id", type=click.IntRange(1), help="A stored run (default: the newest).")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.option(
    "--part",
    type=click.Choice(["summary", "breaks", "exceptions"]),
    default="summary",
    show_default=True,
    help="With --format csv: the run's summary, its breaks, or the open exceptions queue.",
)
@click.pass_obj
def report(settings: Settings, run_id: int | None, fmt: str, part: str) -> None:
    """Print a stored run: JSON (summary, breaks and open exceptions) or one CSV part."""
    with app_engine(settings, pool_size=1) as engine, engine.connect() as conn:
        run = reconciliation.get_run(conn, run_id)
        exceptions = reconciliation.open_exceptions_report(conn)
    if fmt == "json":
        emit({**run, "open_exceptions": exceptions})
        return
    text: str
    if part == "summary":
        text = reconciliation.summary_csv(run)
    elif part == "breaks":
        text = reconciliation.breaks_csv(run["breaks"])
    else:
        text = reconciliation.exceptions_csv(exceptions)
    click.echo(text, nl=False)


@reconcile.command("reserves")
@click.option("--at-block", type=click.IntRange(0), help="Default: the last block the books followed.")
@click.pass_obj
def reserves(settings: Settings, at_block: int | None) -> None:
    """Print the proof of reserves: per custody address, what the books owe out of it against what
    it holds on chain at the block. Exit 1 when an address does not cover its liabilities."""
    deployment = load_deployment(settings)
    w3 = chain_node(settings)
    with app_engine(settings, pool_size=1) as engine:
        try:
            statement: dict[str, Any] = recon.reserves(engine, w3, deployment, at_block)
        except ProviderError as exc:
            raise Failed(f"the chain node failed: {exc}") from exc
    emit(statement)
    if not statement["solvent"]:
        raise Failed("a custody address holds less than the books owe out of it")
