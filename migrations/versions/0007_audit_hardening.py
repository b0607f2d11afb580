"""audit hardening: parameters as used, anonymous refusals counted, logs closed to TRUNCATE/REPLACE

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

- `audit_events.params`: the decoded query parameters the service used, in full, beside the raw
  query, so a filter cannot hide behind padding or percent-encoding.
- `audit_anonymous`: requests from no identified staff member, counted per client address,
  minute and status with one bounded sample, so unauthenticated traffic cannot fill the database.
  The count may only grow; rows cannot be deleted.
- The append-only logs refuse TRUNCATE on PostgreSQL (row triggers do not fire for it) and
  INSERT OR REPLACE on SQLite (its implicit delete fires no DELETE trigger).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Each append-only table with the columns of its primary key.
APPEND_ONLY = {
    "audit_events": ("id",),
    "audit_recordings": ("audit_id", "recording_id"),
    "callback_log": ("id",),
    "legal_hold_events": ("id",),
}
# What may never change in a row of audit_anonymous: only `count`, `last_at` grow.
ANONYMOUS_FIXED = (
    "id",
    "window_start",
    "remote_addr",
    "status",
    "first_at",
    "method",
    "path",
    "user_agent",
)


def _close_postgresql() -> None:
    # refuse_change() was created by 0001; it works for statement triggers too.
    for table in APPEND_ONLY:
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse_change()"
        )
    changed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in ANONYMOUS_FIXED)
    op.execute(
        f"""
        CREATE FUNCTION refuse_shrink() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {changed} OR NEW.count < OLD.count OR NEW.last_at < OLD.last_at THEN
                RAISE EXCEPTION '% may only count up', TG_TABLE_NAME;
            END IF;
            RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_anonymous_grow_only BEFORE UPDATE ON audit_anonymous "
        "FOR EACH ROW EXECUTE FUNCTION refuse_shrink()"
    )
    op.execute(
        "CREATE TRIGGER audit_anonymous_append_only BEFORE DELETE ON audit_anonymous "
        "FOR EACH ROW EXECUTE FUNCTION refuse_change()"
    )
    op.execute(
        "CREATE TRIGGER audit_anonymous_no_truncate BEFORE TRUNCATE ON audit_anonymous "
        "FOR EACH STATEMENT EXECUTE FUNCTION refuse_change()"
    )


def _close_sqlite() -> None:
    # REPLACE deletes the existing row without firing DELETE triggers (unless the connection
    # set recursive_triggers), so an insert that meets an existing key is refused outright.
    # An insert without an explicit id sees NEW.id = -1 here, which matches no row.
    for table, key in (*APPEND_ONLY.items(), ("audit_anonymous", ("id",))):
        match = " AND ".join(f"{c} = NEW.{c}" for c in key)
        op.execute(
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "  # noqa: S608 - constants
            f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {match}) "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )
    # REPLACE on the log's other unique key, its nonce, would delete the request that used it:
    # a nonce already logged makes the insert do nothing (as ON CONFLICT DO NOTHING does).
    op.execute(
        "CREATE TRIGGER callback_log_nonce_once BEFORE INSERT ON callback_log "
        "WHEN EXISTS (SELECT 1 FROM callback_log WHERE nonce = NEW.nonce AND id IS NOT NEW.id) "
        "BEGIN SELECT RAISE(IGNORE); END"
    )
    changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in ANONYMOUS_FIXED)
    op.execute(
        "CREATE TRIGGER audit_anonymous_grow_only BEFORE UPDATE ON audit_anonymous "
        f"WHEN {changed} OR NEW.count < OLD.count OR NEW.last_at < OLD.last_at "
        "BEGIN SELECT RAISE(ABORT, 'audit_anonymous may only count up'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_anonymous_no_delete BEFORE DELETE ON audit_anonymous "
        "BEGIN SELECT RAISE(ABORT, 'audit_anonymous is append-only'); END"
    )


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("params", sa.JSON(), nullable=True))
    op.create_table(
        "audit_anonymous",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=256), nullable=False),
        sa.Column("user_agent", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "window_start", "remote_addr", "status", name="uq_audit_anonymous_window"
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        _close_postgresql()
    else:
        _close_sqlite()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in (*APPEND_ONLY, "audit_anonymous"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        for trigger in ("audit_anonymous_grow_only", "audit_anonymous_append_only"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON audit_anonymous")
        op.execute("DROP FUNCTION IF EXISTS refuse_shrink()")
    else:
        for table in (*APPEND_ONLY, "audit_anonymous"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
        for trigger in (
            "audit_anonymous_grow_only",
            "audit_anonymous_no_delete",
            "callback_log_nonce_once",
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.drop_table("audit_anonymous")
    # Not in batch mode: rebuilding the table on SQLite would drop the triggers of 0001.
    op.drop_column("audit_events", "params")
