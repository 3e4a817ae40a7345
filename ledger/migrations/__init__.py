"""Alembic migrations of the ledger schema; what every revision shares."""

from __future__ import annotations

from collections.abc import Callable

from alembic import context, op


def application_role() -> str:
    """The role the application acts as (set by ``ledger.db.upgrade``), checked before it is
    written into SQL."""
    role = str(context.config.attributes.get("app_role", "tracechain_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"unusable application role name {role!r}")
    return role


def apply(*statements: str, grants: Callable[[str], str] | None) -> None:
    """Run a revision's DDL, then its grants to the application role (None: it grants nothing)."""
    role = application_role()
    for sql in statements:
        op.execute(sql)
    if grants is not None:
        op.execute(grants(role))
