"""callbacks of every kind in one log, which also keeps their nonces

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

The callback log gains the kind of callback (recording, member event, transcription; a member
event has no recording id) and a unique nonce. The nonce table that was pruned after a day goes:
a nonce stays refused as long as the signed request that carried it can be read from the log.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _sqlite_triggers(create: bool) -> None:
    # Rebuilding callback_log on SQLite (to relax NOT NULL) drops its triggers: take them down
    # first, put them back after.
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS callback_log_no_{action}")
        if create:
            op.execute(
                f"CREATE TRIGGER callback_log_no_{action} BEFORE {action.upper()} ON callback_log "
                "BEGIN SELECT RAISE(ABORT, 'callback_log is append-only'); END"
            )


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        _sqlite_triggers(create=False)
    with op.batch_alter_table("callback_log") as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="recording", nullable=False)
        )
        batch_op.alter_column("recording_id", existing_type=sa.String(length=64), nullable=True)
        batch_op.create_unique_constraint("uq_callback_log_nonce", ["nonce"])
    if sqlite:
        _sqlite_triggers(create=True)
    op.drop_index("ix_seen_nonces_seen_at", table_name="seen_nonces")
    op.drop_table("seen_nonces")


def downgrade() -> None:
    op.create_table(
        "seen_nonces",
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    op.create_index("ix_seen_nonces_seen_at", "seen_nonces", ["seen_at"], unique=False)
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        _sqlite_triggers(create=False)
    with op.batch_alter_table("callback_log") as batch_op:
        batch_op.drop_constraint("uq_callback_log_nonce", type_="unique")
        # Member events have no recording id; the old schema cannot hold them.
        batch_op.alter_column("recording_id", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("kind")
    if sqlite:
        _sqlite_triggers(create=True)
