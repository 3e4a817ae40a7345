"""``tracechain treasury``: TRACE minted into the treasury wallet (the admin API does the same).
Writes are audited under the shell user (``cli:<user>``)."""

from __future__ import annotations

import click

from admin_api.cli.runtime import app_engine, base_units, cli_actor, emit, load_deployment
from ledger import audit, treasury
from ledger.audit import AuditRecord
from ledger.settings import Settings


@click.group("treasury")
def treasury_group() -> None:
    """The treasury wallet: mint TRACE into it, show a top-up."""


@treasury_group.command("mint")
@click.option("--amount", callback=base_units, required=True, help="Base units (10^18 per TRACE).")
@click.option(
    "--key", required=True, help="Idempotency key: the same key and amount again is the same top-up."
)
@click.pass_obj
def mint(settings: Settings, amount: int, key: str) -> None:
    """Hold and queue a mint of AMOUNT into the treasury; the sender sends it. Prints the top-up
    and `result` (created or exists)."""
    actor = cli_actor("treasury-mint")
    deployment = load_deployment(settings)
    with app_engine(settings) as engine, engine.begin() as conn:
        top_up, status = treasury.mint(
            conn, deployment.chain_id, deployment.token, deployment.treasury, amount, key=key
        )
        out = top_up.as_dict()
        if status == "created":
            audit.record(conn, [AuditRecord(actor, "treasury.mint", f"treasury:mint:{key}", None, out)])
    emit({**out, "result": status})


@treasury_group.command("show")
@click.argument("key")
@click.pass_obj
def show(settings: Settings, key: str) -> None:
    """Print the top-up made under KEY and where its mint stands."""
    with app_engine(settings) as engine, engine.connect() as conn:
        emit(treasury.get(conn, key).as_dict())
