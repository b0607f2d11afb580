"""staff names reusable once revoked; refused-callback counts; archive duration

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29

- A staff name is unique among active staff only, so a revoked name can be given again and a
  token rotated (revoke and re-issue under the same name in one transaction).
- Refused callbacks store nothing else, so for the metrics they are counted per reason and
  minute (bounded: one row per reason a minute, however many requests are refused).
- How long archiving a recording took, for the archive-duration metric.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ACTIVE = {
    "postgresql_where": sa.text("revoked_at IS NULL"),
    "sqlite_where": sa.text("revoked_at IS NULL"),
}


def _staff_table(name_unique: bool) -> sa.Table:
    """The staff table as SQLite's batch mode must rebuild it (its constraints have no names)."""
    return sa.Table(
        "staff",
        sa.MetaData(),
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        *([sa.UniqueConstraint("name")] if name_unique else []),
        sa.UniqueConstraint("token_hash"),
    )


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        with op.batch_alter_table("staff", recreate="always", copy_from=_staff_table(False)):
            pass
    else:
        op.drop_constraint("staff_name_key", "staff", type_="unique")
    op.create_index("uq_staff_active_name", "staff", ["name"], unique=True, **ACTIVE)

    op.create_table(
        "callback_refusals",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "reason"),
    )
    with op.batch_alter_table("recordings") as batch_op:
        batch_op.add_column(sa.Column("archive_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recordings") as batch_op:
        batch_op.drop_column("archive_seconds")
    op.drop_table("callback_refusals")
    op.drop_index("uq_staff_active_name", table_name="staff")
    # Fails if a revoked name was given again: which row keeps the name is not ours to choose.
    if op.get_context().dialect.name == "sqlite":
        with op.batch_alter_table("staff", recreate="always", copy_from=_staff_table(True)):
            pass
    else:
        op.create_unique_constraint("staff_name_key", "staff", ["name"])
