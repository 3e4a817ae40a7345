"""``tracechain db``: schema migrations."""

from __future__ import annotations

import click
import sqlalchemy as sa

from admin_api.cli.runtime import Failed, database_url, emit, shown_url
from ledger import db as ledger_db
from ledger.settings import Settings


@click.group("db")
def db() -> None:
    """Database schema: migrate and show the revision."""


@db.command("upgrade")
@click.pass_obj
def upgrade(settings: Settings) -> None:
    """Migrate the database to the newest revision (as the login user) and print it."""
    with database_url(settings) as url:
        try:
            revision = ledger_db.upgrade(url, role=settings.db_role)
        except sa.exc.OperationalError as exc:
            raise Failed(f"cannot migrate {shown_url(url)}: {str(exc.orig).strip()}") from exc
    emit({"revision": revision})


@db.command("current")
@click.pass_obj
def current(settings: Settings) -> None:
    """Print the database's revision next to the one this code needs."""
    with database_url(settings) as url:
        engine = ledger_db.make_engine(url, role=None, pool_size=1)
        try:
            with engine.connect() as conn:
                revision = ledger_db.current_revision(conn)
        finally:
            engine.dispose()
    head = ledger_db.head_revision()
    emit({"revision": revision, "head": head, "at_head": revision == head})
