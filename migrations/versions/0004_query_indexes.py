"""indexes for the compliance queries

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21

Measured on 1 000 000 recordings (bench/query.py): `status` with a deep cursor and
`legal_hold=true` scanned instead of seeking, and `conference_prefix` could not use the
collation-bound index on conference_name.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_recordings_status", table_name="recordings")
    op.create_index("ix_recordings_status_start_ms_id", "recordings", ["status", "start_ms", "id"])
    op.create_index(
        "ix_recordings_held_start_ms_id",
        "recordings",
        ["start_ms", "id"],
        postgresql_where=sa.text("legal_hold"),
        sqlite_where=sa.text("legal_hold = 1"),
    )
    op.drop_index("ix_recordings_conference_name", table_name="recordings")
    op.create_index(
        "ix_recordings_conference_name",
        "recordings",
        ["conference_name"],
        postgresql_ops={"conference_name": "varchar_pattern_ops"},
    )


def downgrade() -> None:
    op.drop_index("ix_recordings_conference_name", table_name="recordings")
    op.create_index("ix_recordings_conference_name", "recordings", ["conference_name"])
    op.drop_index("ix_recordings_held_start_ms_id", table_name="recordings")
    op.drop_index("ix_recordings_status_start_ms_id", table_name="recordings")
    op.create_index("ix_recordings_status", "recordings", ["status"])
