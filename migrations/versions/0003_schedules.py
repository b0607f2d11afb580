"""schedules of periodic chores

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

One row per periodic chore (nonce pruning, reconcile) with when it is next due, so that of
several workers exactly one runs each turn.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("schedules")
