"""What every ``tracechain`` command shares: errors and exit codes, the database, output."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
import sqlalchemy as sa

from ledger import db
from ledger.audit import Actor
from ledger.settings import Settings

if TYPE_CHECKING:
    from web3 import Web3

    from contracts.deployment import Deployment

EXIT_OK = 0
EXIT_FAILED = 1  # something was rejected or does not hold
EXIT_USAGE = 2  # bad usage, as click's own usage errors


class Failed(click.ClickException):
    """A command could not do its work, or what it checks does not hold (exit 1)."""

    exit_code = EXIT_FAILED


class BadUsage(click.ClickException):
    """An option or setting is unusable (exit 2)."""

    exit_code = EXIT_USAGE


def parse_timestamp(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Option callback: an ISO 8601 timestamp with a time zone (``2026-01-01T00:00:00Z``)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 timestamp", param=param) from None
    if parsed.tzinfo is None:
        raise click.BadParameter(f"{value!r} needs a time zone (e.g. 2026-01-01T00:00:00Z)", param=param)
    return parsed


def emit(report: Any) -> None:
    """Print one result a person may read: indented JSON on stdout."""
    click.echo(json.dumps(report, indent=2, ensure_ascii=False))


def emit_line(record: Any) -> None:
    """Print one JSON Lines record on stdout."""
    click.echo(json.dumps(record, separators=(",", ":"), ensure_ascii=False))


def shown_url(url: str) -> str:
    """A database URL fit for messages: libpq spelling, password hidden."""
    return sa.engine.make_url(db.libpq_url(url)).render_as_string(hide_password=True)


def cli_actor(action: str) -> Actor:
    """Who is behind a write made from the command line, for the audit log."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return Actor(f"cli:{user}", "cli", f"{action}-{uuid.uuid4().hex[:16]}")


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """``TRACE_DATABASE_URL``, else the embedded PostgreSQL under the data directory.

    An embedded server this call started is stopped again when the block ends (one-shot
    commands); one that was already running (``tracechain dev``) is left alone.
    """
    if settings.database_url:
        yield settings.database_url
        return
    from admin_api.embedded import EmbeddedServiceError, start_postgres

    try:
        service = start_postgres(settings.data_dir)
    except EmbeddedServiceError as exc:
        raise Failed(f"cannot start the embedded PostgreSQL: {exc}") from exc
    owner = os.getpid()
    try:
        yield service.url
    finally:
        # A forked child (a gunicorn worker) leaving this block must not stop the server.
        if os.getpid() == owner:
            service.stop()


def _unreachable(url: str, exc: sa.exc.DBAPIError) -> Failed:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    return Failed(f"cannot use the database {shown_url(url)}: {first}")


def require_head(url: str) -> str:
    """Fail unless the database is migrated to the revision this code needs; returns it."""
    engine = db.make_engine(url, role=None, pool_size=1)
    # Alembic announces its context at INFO on every look; only migrations should say that.
    alembic_log = logging.getLogger("alembic.runtime.migration")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        with engine.connect() as conn:
            current = db.current_revision(conn)
    except sa.exc.OperationalError as exc:
        raise _unreachable(url, exc) from exc
    finally:
        alembic_log.setLevel(level)
        engine.dispose()
    head = db.head_revision()
    if current != head:
        raise Failed(
            f"the database {shown_url(url)} is at revision {current or 'none (never migrated)'},"
            f" this code needs {head}: run `tracechain db upgrade` first"
        )
    return head


@contextlib.contextmanager
def app_engine(settings: Settings, *, pool_size: int = 2) -> Iterator[sa.Engine]:
    """An engine acting as the application role on a database at the newest revision."""
    with database_url(settings) as url:
        require_head(url)
        engine = db.make_engine(url, role=settings.db_role, pool_size=pool_size)
        try:
            yield engine
        except sa.exc.OperationalError as exc:
            raise _unreachable(url, exc) from exc
        finally:
            engine.dispose()


def load_deployment(settings: Settings) -> Deployment:
    """The deployment record every chain command reads (exit 1 when it is missing or unusable)."""
    from contracts.deployment import Deployment, DeploymentError

    try:
        return Deployment.load(settings.deployment_path)
    except (OSError, DeploymentError) as exc:
        raise Failed(f"no usable deployment record at {settings.deployment_path}: {exc}") from exc


def chain_node(settings: Settings) -> Web3:
    """The chain's JSON-RPC node (exit 2 when ``TRACE_RPC_URL`` is not set)."""
    from web3 import Web3

    if not settings.rpc_url:
        raise BadUsage("TRACE_RPC_URL is not set (the chain's JSON-RPC URL)")
    return Web3(Web3.HTTPProvider(settings.rpc_url, request_kwargs={"timeout": 30}))


def base_units(_ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Option callback: an amount in base units, digits only (0 allowed where a part may be empty)."""
    from ledger.errors import InvalidInput
    from ledger.money import parse_amount

    if value is None:
        return None
    if value == "0":
        return 0
    try:
        return parse_amount(value)
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param=param) from None
