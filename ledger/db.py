"""Database engines, the application role, and schema migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def sqlalchemy_url(url: str) -> str:
    """Normalise a PostgreSQL URL to the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url.rsplit('@', maxsplit=1)[-1]!r}")


def libpq_url(url: str) -> str:
    """The same URL as libpq (psql, psycopg.connect) spells it."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]


def make_engine(url: str, *, role: str | None, pool_size: int = 5, **kwargs: Any) -> sa.Engine:
    """An engine whose connections act as the application ``role`` (None: as the login user).

    The application role may only SELECT and INSERT on the ledger tables; balances change only
    through the transfer trigger. Migrations run as the login user (the owner).
    """
    engine = sa.create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        **kwargs,
    )
    if role is not None:
        statement = f'SET ROLE "{_checked_role(role)}"'

        @sa.event.listens_for(engine, "connect")
        def _set_role(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(statement)
            dbapi_connection.commit()

    return engine


def _checked_role(role: str) -> str:
    if not role or not role.replace("_", "").isalnum():
        raise ValueError(f"unusable database role name {role!r}")
    return role


def _alembic_config(connection: sa.Connection, role: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["app_role"] = _checked_role(role)
    return config


def upgrade(url: str, *, role: str) -> str:
    """Migrate the database at ``url`` to the newest revision; returns that revision."""
    engine = make_engine(url, role=None, pool_size=1)
    try:
        with engine.begin() as connection:
            # One migrator at a time: concurrent `release` runs wait instead of racing.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7203400001)")
            command.upgrade(_alembic_config(connection, role), "head")
        return head_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision the code knows."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


def current_revision(connection: sa.Connection) -> str | None:
    """The revision the database is at (None when it was never migrated)."""
    return MigrationContext.configure(connection).get_current_revision()
