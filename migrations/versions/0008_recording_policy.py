"""recording policy: resumable reconcile, conference claims, notices, deletion from Plivo

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

`reconcile --since` keeps its progress; one claim per live conference so auto-record and the API
start one recording, not two; every recording notice played or failed, and every deletion from
Plivo, kept append-only; the recording shows when it was deleted from Plivo or why it never will be.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
APPEND_ONLY = ("recording_notices", "plivo_deletions")
DELETE_DUE = "status = 'archived' AND plivo_deleted_at IS NULL"


def upgrade() -> None:
    op.add_column("recordings", sa.Column("plivo_deleted_at", sa.DateTime(timezone=True)))
    op.add_column("recordings", sa.Column("archive_mismatch", sa.Text()))
    op.create_index(
        "ix_recordings_plivo_delete_due",
        "recordings",
        ["end_ms"],
        postgresql_where=sa.text(DELETE_DUE),
        sqlite_where=sa.text(DELETE_DUE),
    )
    op.create_table(
        "reconcile_runs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("since"),
    )
    op.create_table(
        "conference_claims",
        sa.Column("conference_name", sa.String(length=255), nullable=False),
        sa.Column("token", sa.String(length=36), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("conference_name"),
    )
    op.create_index(
        "ix_conference_claims_recording_id", "conference_claims", ["recording_id"], unique=False
    )
    op.create_table(
        "recording_notices",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("recording_pk", BIG_ID, nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("call_uuid", sa.String(length=64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["recording_pk"], ["recordings.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_recording_notices_recording_pk", "recording_notices", ["recording_pk", "member_id"]
    )
    op.create_table(
        "plivo_deletions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_plivo_deletions_recording_id", "plivo_deletions", ["recording_id"])
    for table in APPEND_ONLY:
        if op.get_bind().dialect.name == "postgresql":
            # refuse_change() was created by 0001.
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_change()"
            )
            continue
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )


def downgrade() -> None:
    for table in APPEND_ONLY:
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            continue
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
    op.drop_index("ix_plivo_deletions_recording_id", table_name="plivo_deletions")
    op.drop_table("plivo_deletions")
    op.drop_index("ix_recording_notices_recording_pk", table_name="recording_notices")
    op.drop_table("recording_notices")
    op.drop_index("ix_conference_claims_recording_id", table_name="conference_claims")
    op.drop_table("conference_claims")
    op.drop_table("reconcile_runs")
    op.drop_index("ix_recordings_plivo_delete_due", table_name="recordings")
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("archive_mismatch")
        batch.drop_column("plivo_deleted_at")
