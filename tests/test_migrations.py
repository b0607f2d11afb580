"""The schema exists only through Alembic migrations: they run up and down, and match the models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.conftest import ON_POSTGRES, TEST_DATABASE_URL
from webhook.config import normalise_database_url
from webhook.db import alembic_config, upgrade
from webhook.fulltext import is_search_structure
from webhook.models import Base, utcnow


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all."""
    if not ON_POSTGRES:
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    admin_url = sa.make_url(normalise_database_url(str(TEST_DATABASE_URL)))
    name = f"webhook_mig_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        names = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        return {name for name in names if not is_search_structure(name)}
    finally:
        engine.dispose()


def test_migrations_run_up_down_and_up_again(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    assert table_names(empty_database_url) == set(Base.metadata.tables)
    upgrade(empty_database_url, "head")  # idempotent, as the release phase runs it every deploy
    command.downgrade(alembic_config(empty_database_url), "base")
    assert table_names(empty_database_url) == set()
    upgrade(empty_database_url)
    assert table_names(empty_database_url) == set(Base.metadata.tables)


def test_models_match_the_migrated_schema(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        # The full-text structures (FTS5 table, GIN expression index) exist only in migrations.
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, _type, _parents: not is_search_structure(name),
            },
        )
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


@pytest.mark.parametrize(
    ("table", "row"),
    [
        (
            "audit_events",
            {"at": utcnow(), "method": "GET", "path": "/api/x", "query": "", "status": 200},
        ),
        (
            "callback_log",
            {
                "received_at": utcnow(),
                "recording_id": "r",
                "method": "POST",
                "headers": {},
                "body": "",
                "query": "",
                "signature_verdict": "v3",
                "nonce": "n",
                "duplicate": False,
            },
        ),
    ],
)
def test_logs_are_append_only_in_the_database(database_url: str, table: str, row: dict) -> None:
    engine = sa.create_engine(database_url)
    model_table = Base.metadata.tables[table]
    with engine.begin() as conn:
        conn.execute(model_table.insert().values(**row))
    for statement in (
        model_table.update().values(method="PUT"),
        model_table.delete(),
    ):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(model_table)).scalar() == 1
    engine.dispose()


def test_transcript_search_structures_come_and_go_with_the_migration(
    empty_database_url: str,
) -> None:
    def search_structures() -> set[str]:
        engine = sa.create_engine(empty_database_url)
        try:
            inspector = sa.inspect(engine)
            names = set(inspector.get_table_names())
            if "transcripts" in names:
                names |= {index["name"] or "" for index in inspector.get_indexes("transcripts")}
            return {name for name in names if is_search_structure(name)}
        finally:
            engine.dispose()

    upgrade(empty_database_url)
    expected = {"ix_transcripts_text_fts"} if ON_POSTGRES else {"transcripts_fts"}
    assert expected <= search_structures()
    command.downgrade(alembic_config(empty_database_url), "0005")
    assert search_structures() == set()
