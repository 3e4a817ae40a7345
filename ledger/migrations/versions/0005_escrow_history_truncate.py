"""Escrow history cannot be wiped by TRUNCATE either (row triggers do not fire on it).

Revision ID: 0005_escrow_history_truncate
Revises: 0004_disputes
"""

from __future__ import annotations

from ledger.migrations import apply

revision = "0005_escrow_history_truncate"
down_revision = "0004_disputes"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TRIGGER escrow_history_no_truncate BEFORE TRUNCATE ON escrow_history
    FOR EACH STATEMENT EXECUTE FUNCTION escrow_history_append_only();
"""


def upgrade() -> None:
    # The application role never had TRUNCATE here (0003 grants SELECT and INSERT); the trigger
    # stops the owner too.
    apply(SCHEMA, grants=None)


def downgrade() -> None:
    raise NotImplementedError("escrow history is kept for good; restore from a backup instead")
