"""Alembic environment: migrations always run on a connection handed in by ledger.db."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `tracechain db upgrade` (ledger.db.upgrade)")
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
