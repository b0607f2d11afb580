"""conference members, their events, and participants with join and leave times

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29

Member events (Conference XML's enter and exit) are kept append-only as received, once each.
They, the snapshot taken when a recording starts and re-reads while it runs are folded into one
row per call and conference (`conference_members`). A recording's participants stay rows of
`participants`, now copies of the members present while it ran, with join and leave times and
where they were learnt; the rows snapshotted so far stay as they are, marked `snapshot`.
Recordings gain their conference's UUID.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _append_only(table: str, create: bool) -> None:
    """UPDATE and DELETE refused, and what gets round them: TRUNCATE on PostgreSQL (row triggers
    do not fire for it), INSERT OR REPLACE on SQLite (its implicit delete fires no trigger)."""
    if op.get_bind().dialect.name == "postgresql":
        # refuse_change() was created by 0001; it works for statement triggers too.
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        if create:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION refuse_change()"
            )
        return
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
        if create:
            op.execute(
                f"CREATE TRIGGER {table}_no_{action} BEFORE {action.upper()} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )
    op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
    if create:
        # An insert without an explicit id sees NEW.id = -1 here, which matches no row.
        op.execute(
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "  # noqa: S608 - constants
            f"WHEN EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def upgrade() -> None:
    op.create_table(
        "conference_members",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("conference_name", sa.String(length=255), nullable=False),
        sa.Column("conference_uuid", sa.String(length=64), nullable=True),
        sa.Column("identity", sa.String(length=160), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=True),
        sa.Column("call_uuid", sa.String(length=64), nullable=True),
        sa.Column("from", sa.String(length=255), nullable=True),
        sa.Column("to", sa.String(length=255), nullable=True),
        sa.Column("caller_name", sa.String(length=255), nullable=True),
        sa.Column("direction", sa.String(length=16), nullable=True),
        sa.Column("join_time", sa.String(length=32), nullable=True),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("left_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("details_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("details_attempts", sa.Integer(), nullable=False),
        sa.Column("details_next_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("details_error", sa.Text(), nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("conference_name", "identity", name="uq_conference_members_identity"),
    )
    op.create_index(
        "ix_conference_members_name_last_seen",
        "conference_members",
        ["conference_name", "last_seen_at"],
    )
    op.create_index(
        "ix_conference_members_conference_uuid", "conference_members", ["conference_uuid"]
    )
    op.create_index(
        "ix_conference_members_details_due",
        "conference_members",
        ["details_next_at"],
        postgresql_where=sa.text("details_at IS NULL"),
        sqlite_where=sa.text("details_at IS NULL"),
    )

    op.create_table(
        "member_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("conference_name", sa.String(length=255), nullable=False),
        sa.Column("conference_uuid", sa.String(length=64), nullable=True),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("call_uuid", sa.String(length=64), nullable=True),
        sa.Column("from", sa.String(length=255), nullable=True),
        sa.Column("to", sa.String(length=255), nullable=True),
        sa.Column("event_key", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_key", name="uq_member_events_event_key"),
    )
    _append_only("member_events", create=True)

    with op.batch_alter_table("recordings") as batch_op:
        batch_op.add_column(sa.Column("conference_uuid", sa.String(length=64), nullable=True))

    with op.batch_alter_table("participants") as batch_op:
        batch_op.add_column(sa.Column("member_pk", BIG_ID, nullable=True))
        batch_op.add_column(sa.Column("joined_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("left_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("source", sa.String(length=16), nullable=True))
        batch_op.create_foreign_key(
            "fk_participants_member_pk",
            "conference_members",
            ["member_pk"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_unique_constraint(
            "uq_participants_recording_member", ["recording_pk", "member_pk"]
        )
        batch_op.create_index("ix_participants_member_pk", ["member_pk"])
    # Every participant so far was snapshotted when its recording started through the API.
    op.execute("UPDATE participants SET source = 'snapshot'")


def downgrade() -> None:
    # Participants learnt from members have no place in the old schema: only snapshots stay.
    op.execute("DELETE FROM participants WHERE member_pk IS NOT NULL")
    with op.batch_alter_table("participants") as batch_op:
        batch_op.drop_index("ix_participants_member_pk")
        batch_op.drop_constraint("uq_participants_recording_member", type_="unique")
        batch_op.drop_constraint("fk_participants_member_pk", type_="foreignkey")
        batch_op.drop_column("source")
        batch_op.drop_column("left_at")
        batch_op.drop_column("joined_at")
        batch_op.drop_column("member_pk")
    with op.batch_alter_table("recordings") as batch_op:
        batch_op.drop_column("conference_uuid")
    _append_only("member_events", create=False)
    op.drop_table("member_events")
    op.drop_index("ix_conference_members_details_due", table_name="conference_members")
    op.drop_index("ix_conference_members_conference_uuid", table_name="conference_members")
    op.drop_index("ix_conference_members_name_last_seen", table_name="conference_members")
    op.drop_table("conference_members")
