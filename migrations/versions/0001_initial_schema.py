"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Recordings (which are also the archive queue), their participants, staff tokens, the seen-nonce
window, and two append-only logs (callbacks, staff access) that the database itself refuses to
update or delete.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
APPEND_ONLY = ("audit_events", "audit_recordings", "callback_log")


def _forbid_changes() -> None:
    """Make the logs append-only in the database itself, not only in the code."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
            END $$
            """
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_change()"
            )
        return
    for table in APPEND_ONLY:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )


def _allow_changes() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute("DROP FUNCTION IF EXISTS refuse_change()")
        return
    for table in APPEND_ONLY:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("staff_name", sa.String(length=64), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_at_id", ["at", "id"], unique=False)
        batch_op.create_index("ix_audit_events_staff_name", ["staff_name"], unique=False)

    op.create_table(
        "callback_log",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("signature_verdict", sa.String(length=16), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("duplicate", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("callback_log", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_callback_log_recording_id"), ["recording_id"], unique=False
        )

    op.create_table(
        "recordings",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=False),
        sa.Column("conference_name", sa.String(length=255), nullable=True),
        sa.Column("api_id", sa.String(length=64), nullable=True),
        sa.Column("record_url", sa.Text(), nullable=True),
        sa.Column("file_format", sa.String(length=8), nullable=True),
        sa.Column("duration_s", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("end_ms", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_token", sa.String(length=36), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("archive_key", sa.String(length=512), nullable=True),
        sa.Column("archive_size", sa.BigInteger(), nullable=True),
        sa.Column("archive_sha256", sa.String(length=64), nullable=True),
        sa.Column("archive_version_id", sa.String(length=1024), nullable=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("legal_hold", sa.Boolean(), nullable=False),
        sa.Column("legal_hold_reason", sa.Text(), nullable=True),
        sa.Column("started_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("recording_id"),
    )
    with op.batch_alter_table("recordings", schema=None) as batch_op:
        batch_op.create_index("ix_recordings_conference_name", ["conference_name"], unique=False)
        batch_op.create_index(
            "ix_recordings_queue",
            ["next_attempt_at"],
            unique=False,
            postgresql_where=sa.text("status IN ('pending', 'archiving')"),
            sqlite_where=sa.text("status IN ('pending', 'archiving')"),
        )
        batch_op.create_index("ix_recordings_start_ms_id", ["start_ms", "id"], unique=False)
        batch_op.create_index("ix_recordings_status", ["status"], unique=False)

    op.create_table(
        "seen_nonces",
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    with op.batch_alter_table("seen_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_seen_nonces_seen_at"), ["seen_at"], unique=False)

    op.create_table(
        "staff",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "audit_recordings",
        sa.Column("audit_id", BIG_ID, nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["audit_id"], ["audit_events.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("audit_id", "recording_id"),
    )
    with op.batch_alter_table("audit_recordings", schema=None) as batch_op:
        batch_op.create_index("ix_audit_recordings_recording_id", ["recording_id"], unique=False)

    op.create_table(
        "participants",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("recording_pk", BIG_ID, nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=True),
        sa.Column("from", sa.String(length=255), nullable=True),
        sa.Column("to", sa.String(length=255), nullable=True),
        sa.Column("from_key", sa.String(length=255), nullable=True),
        sa.Column("to_key", sa.String(length=255), nullable=True),
        sa.Column("caller_name", sa.String(length=255), nullable=True),
        sa.Column("direction", sa.String(length=16), nullable=True),
        sa.Column("call_uuid", sa.String(length=64), nullable=True),
        sa.Column("join_time", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["recording_pk"], ["recordings.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("participants", schema=None) as batch_op:
        batch_op.create_index("ix_participants_from_key", ["from_key"], unique=False)
        batch_op.create_index("ix_participants_recording_pk", ["recording_pk"], unique=False)
        batch_op.create_index("ix_participants_to_key", ["to_key"], unique=False)

    _forbid_changes()


def downgrade() -> None:
    _allow_changes()
    with op.batch_alter_table("participants", schema=None) as batch_op:
        batch_op.drop_index("ix_participants_to_key")
        batch_op.drop_index("ix_participants_recording_pk")
        batch_op.drop_index("ix_participants_from_key")

    op.drop_table("participants")
    with op.batch_alter_table("audit_recordings", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_recordings_recording_id")

    op.drop_table("audit_recordings")
    op.drop_table("staff")
    with op.batch_alter_table("seen_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_seen_nonces_seen_at"))

    op.drop_table("seen_nonces")
    with op.batch_alter_table("recordings", schema=None) as batch_op:
        batch_op.drop_index("ix_recordings_status")
        batch_op.drop_index("ix_recordings_start_ms_id")
        batch_op.drop_index(
            "ix_recordings_queue",
            postgresql_where=sa.text("status IN ('pending', 'archiving')"),
            sqlite_where=sa.text("status IN ('pending', 'archiving')"),
        )
        batch_op.drop_index("ix_recordings_conference_name")

    op.drop_table("recordings")
    with op.batch_alter_table("callback_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_callback_log_recording_id"))

    op.drop_table("callback_log")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_staff_name")
        batch_op.drop_index("ix_audit_events_at_id")

    op.drop_table("audit_events")
