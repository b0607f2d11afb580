"""legal hold history

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

Every placing or lifting of a legal hold, with who and why, kept append-only like the other logs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "legal_hold_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=False),
        sa.Column("on", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("staff_name", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_legal_hold_events_recording_id", "legal_hold_events", ["recording_id"], unique=False
    )
    if op.get_bind().dialect.name == "postgresql":
        # refuse_change() was created by 0001.
        op.execute(
            "CREATE TRIGGER legal_hold_events_append_only BEFORE UPDATE OR DELETE "
            "ON legal_hold_events FOR EACH ROW EXECUTE FUNCTION refuse_change()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER legal_hold_events_no_{action.lower()} BEFORE {action} "
                "ON legal_hold_events "
                "BEGIN SELECT RAISE(ABORT, 'legal_hold_events is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS legal_hold_events_append_only ON legal_hold_events")
    else:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS legal_hold_events_no_{action}")
    op.drop_index("ix_legal_hold_events_recording_id", table_name="legal_hold_events")
    op.drop_table("legal_hold_events")
