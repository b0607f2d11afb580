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
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
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
        context = MigrationContext.configure(conn, opts={"compare_type": True})
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
        (
            "plivo_deletions",
            {"recording_id": "r", "at": utcnow(), "outcome": "deleted"},
        ),
        (
            "recording_notices",
            {"recording_pk": None, "member_id": "1", "at": utcnow(), "outcome": "played"},
        ),
    ],
)
def test_logs_are_append_only_in_the_database(database_url: str, table: str, row: dict) -> None:
    engine = sa.create_engine(database_url)
    model_table = Base.metadata.tables[table]
    with engine.begin() as conn:
        if "recording_pk" in row:
            recordings = Base.metadata.tables["recordings"]
            row["recording_pk"] = conn.execute(
                recordings.insert()
                .values(
                    recording_id="r",
                    start_ms=0,
                    status="recording",
                    attempts=0,
                    legal_hold=False,
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
                .returning(recordings.c.id)
            ).scalar_one()
        conn.execute(model_table.insert().values(**row))
    changed_column = next(c for c in ("method", "outcome") if c in model_table.c)
    for statement in (
        model_table.update().values({changed_column: "PUT"}),
        model_table.delete(),
    ):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(model_table)).scalar() == 1
    engine.dispose()
