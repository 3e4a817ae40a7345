"""ledger_xid8 without a SET clause, every name schema-qualified, so PostgreSQL inlines it.

A SET clause makes every call save and restore the setting, and rules out inlining: the check
that a statement's transfers belong to entries of its own transaction paid that once per entry.
With every function, operator and type named in pg_catalog, the caller's search_path cannot
change what the function means, which is what the SET clause was there for.

Revision ID: 0007_inline_xid8
Revises: 0006_entry_checks_per_statement
"""

from __future__ import annotations

from ledger.migrations import apply

revision = "0007_inline_xid8"
down_revision = "0006_entry_checks_per_statement"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE OR REPLACE FUNCTION ledger_xid8(x xid) RETURNS xid8 LANGUAGE sql STABLE AS $$
    SELECT CAST(CAST(
        (CASE WHEN CAST(CAST(x AS pg_catalog.text) AS pg_catalog.int8)
                   OPERATOR(pg_catalog.<=)
                   (CAST(CAST(pg_catalog.pg_current_xact_id() AS pg_catalog.text) AS pg_catalog.int8)
                    OPERATOR(pg_catalog.&) 4294967295)
              THEN CAST(CAST(pg_catalog.pg_current_xact_id() AS pg_catalog.text) AS pg_catalog.int8)
                   OPERATOR(pg_catalog.>>) 32
              ELSE (CAST(CAST(pg_catalog.pg_current_xact_id() AS pg_catalog.text) AS pg_catalog.int8)
                    OPERATOR(pg_catalog.>>) 32) OPERATOR(pg_catalog.-) 1 END
         OPERATOR(pg_catalog.*) 4294967296
         OPERATOR(pg_catalog.+) CAST(CAST(x AS pg_catalog.text) AS pg_catalog.int8))
        AS pg_catalog.text) AS pg_catalog.xid8)
$$;
"""


def upgrade() -> None:
    apply(SCHEMA, grants=None)


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
