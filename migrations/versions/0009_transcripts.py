"""transcripts, archived beside the audio and searchable

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

One transcript per recording, keyed by Plivo's recording id (no foreign key: the transcript may
arrive before the recording's callback). Full-text search: on PostgreSQL a stored (generated)
column to_tsvector('simple', text) with a GIN index; on SQLite an FTS5 table over the same text
kept in step by triggers (unicode61 tokenizer keeping accents: both match the same words).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UNARCHIVED = "archived_at IS NULL AND sha256 IS NOT NULL"

# Kept in step with webhook/fulltext.py, which queries them.
# A stored tsvector: checking a row found through another index (recordings newest first) reads
# it instead of parsing the whole transcript again.
PG_SEARCH = (
    "ALTER TABLE transcripts ADD COLUMN search_vector tsvector GENERATED ALWAYS AS "
    "(to_tsvector('simple'::regconfig, coalesce(text, ''))) STORED",
    "CREATE INDEX ix_transcripts_text_fts ON transcripts USING gin (search_vector)",
)
SQLITE_FTS = (
    "CREATE VIRTUAL TABLE transcripts_fts USING fts5(text, content='transcripts', "
    "content_rowid='id', tokenize='unicode61 remove_diacritics 0')",
    "CREATE TRIGGER transcripts_fts_insert AFTER INSERT ON transcripts "
    "WHEN new.text IS NOT NULL BEGIN "
    "INSERT INTO transcripts_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER transcripts_fts_delete AFTER DELETE ON transcripts "
    "WHEN old.text IS NOT NULL BEGIN "
    "INSERT INTO transcripts_fts(transcripts_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER transcripts_fts_update AFTER UPDATE OF text ON transcripts BEGIN "
    "INSERT INTO transcripts_fts(transcripts_fts, rowid, text) "
    "SELECT 'delete', old.id, old.text WHERE old.text IS NOT NULL; "
    "INSERT INTO transcripts_fts(rowid, text) SELECT new.id, new.text "
    "WHERE new.text IS NOT NULL; END",
)


def upgrade() -> None:
    op.create_table(
        "transcripts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("recording_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("chars", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archive_key", sa.String(length=512), nullable=True),
        sa.Column("archive_size", sa.BigInteger(), nullable=True),
        sa.Column("archive_version_id", sa.String(length=1024), nullable=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archive_next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archive_attempts", sa.Integer(), nullable=False),
        sa.Column("archive_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("recording_id"),
    )
    op.create_index(
        "ix_transcripts_unarchived",
        "transcripts",
        ["id"],
        postgresql_where=sa.text(UNARCHIVED),
        sqlite_where=sa.text(UNARCHIVED),
    )
    if op.get_bind().dialect.name == "postgresql":
        for statement in PG_SEARCH:
            op.execute(statement)
    else:
        for statement in SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_transcripts_text_fts")
        op.execute("ALTER TABLE transcripts DROP COLUMN IF EXISTS search_vector")
    else:
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS transcripts_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS transcripts_fts")
    op.drop_index("ix_transcripts_unarchived", table_name="transcripts")
    op.drop_table("transcripts")
