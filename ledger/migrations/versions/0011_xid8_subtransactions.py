"""ledger_xid8 names the right epoch for a subtransaction's xid too.

0007 took an xid for one of the current epoch when it is at most the current top-level xid, and
for one of the epoch before otherwise. A row written inside a savepoint carries the
subtransaction's xid, which is assigned after the top-level one, so it was put an epoch back: the
"transfers belong to this transaction" check then called it a transaction from the future, and
an entry booked inside a savepoint was refused. Every xid still in use lies within 2^31 of the
current one (wraparound protection sees to that), so the right epoch is the one that puts the
xid nearest the current top-level xid, before or after it. Still inlined: no SET clause, every
name schema-qualified.

Revision ID: 0011_xid8_subtransactions
Revises: 0010_reconciliation
"""

from __future__ import annotations

from ledger.migrations import apply

revision = "0011_xid8_subtransactions"
down_revision = "0010_reconciliation"
branch_labels = None
depends_on = None

_TOP = "CAST(CAST(pg_catalog.pg_current_xact_id() AS pg_catalog.text) AS pg_catalog.int8)"
_X = "CAST(CAST(x AS pg_catalog.text) AS pg_catalog.int8)"
_LOW = f"({_TOP} OPERATOR(pg_catalog.&) 4294967295)"
_EPOCH = f"({_TOP} OPERATOR(pg_catalog.>>) 32)"

SCHEMA = f"""
CREATE OR REPLACE FUNCTION ledger_xid8(x xid) RETURNS xid8 LANGUAGE sql STABLE AS $$
    SELECT CAST(CAST(
        {_EPOCH} OPERATOR(pg_catalog.*) 4294967296 OPERATOR(pg_catalog.+) {_X}
        OPERATOR(pg_catalog.+)
        (CASE WHEN {_X} OPERATOR(pg_catalog.-) {_LOW} OPERATOR(pg_catalog.>) 2147483648 THEN -4294967296
              WHEN {_LOW} OPERATOR(pg_catalog.-) {_X} OPERATOR(pg_catalog.>) 2147483648 THEN 4294967296
              ELSE 0 END)
        AS pg_catalog.text) AS pg_catalog.xid8)
$$;
"""


def upgrade() -> None:
    apply(SCHEMA, grants=None)


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
