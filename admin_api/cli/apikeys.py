"""``tracechain apikey``: staff API keys."""

from __future__ import annotations

import click

from admin_api.auth import ROLES, create_api_key, key_prefix, list_api_keys, revoke_api_key
from admin_api.cli.runtime import app_engine, cli_actor, emit
from ledger.settings import Settings


@click.group("apikey")
def apikey() -> None:
    """Staff API keys of the admin API."""


@apikey.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--label", default="", help="Who or what the key is for.")
@click.pass_obj
def create(settings: Settings, role: str, label: str) -> None:
    """Create a key and print it: this is the only time it is shown."""
    with app_engine(settings) as engine, engine.begin() as conn:
        key = create_api_key(conn, role, label, actor=cli_actor("apikey"))
    emit({"key": key, "role": role, "prefix": key_prefix(key), "label": label})


@apikey.command("list")
@click.pass_obj
def list_(settings: Settings) -> None:
    """List the keys (prefixes, roles, labels; never the secrets)."""
    with app_engine(settings) as engine, engine.connect() as conn:
        emit([key.as_dict() for key in list_api_keys(conn)])


@apikey.command("revoke")
@click.argument("prefix")
@click.pass_context
def revoke(ctx: click.Context, prefix: str) -> None:
    """Revoke the key with PREFIX (or given in full); exits 1 if there is no such live key."""
    settings: Settings = ctx.obj
    with app_engine(settings) as engine, engine.begin() as conn:
        revoked = revoke_api_key(conn, prefix, actor=cli_actor("apikey"))
    emit({"prefix": key_prefix(prefix), "revoked": revoked})
    if not revoked:
        ctx.exit(1)
