"""the logs added since are append-only in every way the first ones are

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29

Recording notices and deletions from Plivo refuse TRUNCATE on PostgreSQL and INSERT OR REPLACE
on SQLite, as the other logs do; on SQLite a member event whose key is already logged under another
id is not replaced by a new row (the insert does nothing, as ON CONFLICT DO NOTHING would; the
same id is refused as the other logs refuse it).
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLES = ("recording_notices", "plivo_deletions")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            # refuse_change() was created by 0001; it works for statement triggers too.
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION refuse_change()"
            )
        return
    for table in TABLES:
        # An insert without an explicit id sees NEW.id = -1 here, which matches no row.
        op.execute(
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "  # noqa: S608 - constants
            f"WHEN EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )
    op.execute(
        "CREATE TRIGGER member_events_key_once BEFORE INSERT ON member_events "
        "WHEN EXISTS (SELECT 1 FROM member_events WHERE event_key = NEW.event_key "
        "AND id IS NOT NEW.id) "
        "BEGIN SELECT RAISE(IGNORE); END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        return
    for table in TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
    op.execute("DROP TRIGGER IF EXISTS member_events_key_once")
