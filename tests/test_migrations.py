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
from alembic.script import ScriptDirectory

from tests.conftest import ON_POSTGRES, AppFactory, fresh_postgres_database, token_for
from webhook.config import normalise_database_url
from webhook.db import (
    HEAD_REVISION,
    alembic_config,
    current_revision,
    make_engine,
    migrations_folder,
    migrations_pending,
    upgrade,
)
from webhook.fulltext import is_search_structure
from webhook.models import Base, Role, UTCDateTime, utcnow


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all."""
    if not ON_POSTGRES:
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    with fresh_postgres_database("webhook_mig") as url:
        yield url


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


def test_the_service_knows_the_newest_migration_and_reads_where_a_database_is(
    empty_database_url: str,
) -> None:
    script = ScriptDirectory(str(migrations_folder()))
    assert script.get_current_head() == HEAD_REVISION  # a new migration must move it
    engine = make_engine(empty_database_url)
    try:
        assert current_revision(engine) is None
        assert "has no migrations applied" in (migrations_pending(engine) or "")
        upgrade(empty_database_url, "0012")
        assert current_revision(engine) == "0012"
        assert "is at revision 0012" in (migrations_pending(engine) or "")
        upgrade(empty_database_url)
        assert current_revision(engine) == HEAD_REVISION
        assert migrations_pending(engine) is None
    finally:
        engine.dispose()


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


APPEND_ONLY_ROWS = {
    "audit_events": {"at": utcnow(), "method": "GET", "path": "/api/x", "query": "", "status": 200},
    "callback_log": {
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
    "legal_hold_events": {"recording_id": "r", "on": True, "reason": "x", "staff_name": "s"},
    "member_events": {
        "received_at": utcnow(),
        "action": "enter",
        "conference_name": "c",
        "member_id": "1",
        "event_key": "k",
    },
    "recording_notices": {"member_id": "1", "at": utcnow(), "outcome": "played"},
    "plivo_deletions": {"recording_id": "r", "at": utcnow(), "outcome": "deleted"},
}
# Logs with a second unique key besides their id: a new row may not replace a logged one by it.
UNIQUE_KEYS = {"callback_log": "nonce", "member_events": "event_key"}
APPEND_ONLY_TABLES = [*APPEND_ONLY_ROWS, "audit_recordings"]


def _fill_append_only_tables(conn: sa.Connection) -> None:
    tables = Base.metadata.tables
    for name, row in APPEND_ONLY_ROWS.items():
        values = {"at": utcnow(), **row} if name == "legal_hold_events" else row
        if name in UNIQUE_KEYS:
            values = {**values, UNIQUE_KEYS[name]: uuid.uuid4().hex}
        if name == "recording_notices":
            recordings = tables["recordings"]
            values = {
                **values,
                "recording_pk": conn.execute(
                    recordings.insert()
                    .values(
                        recording_id=uuid.uuid4().hex,
                        start_ms=0,
                        status="recording",
                        attempts=0,
                        legal_hold=False,
                        created_at=utcnow(),
                        updated_at=utcnow(),
                    )
                    .returning(recordings.c.id)
                ).scalar_one(),
            }
        conn.execute(tables[name].insert().values(**values))
    audit_id = conn.execute(sa.select(sa.func.max(tables["audit_events"].c.id))).scalar_one()
    conn.execute(tables["audit_recordings"].insert().values(audit_id=audit_id, recording_id="r"))


def _counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: conn.execute(
                sa.select(sa.func.count()).select_from(Base.metadata.tables[name])
            ).scalar_one()
            for name in APPEND_ONLY_TABLES
        }


@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_logs_refuse_update_and_delete_in_the_database(database_url: str, table: str) -> None:
    engine = sa.create_engine(database_url)
    model_table = Base.metadata.tables[table]
    with engine.begin() as conn:
        _fill_append_only_tables(conn)
    before = _counts(engine)
    key = next(iter(model_table.primary_key.columns))
    for statement in (model_table.update().values({key.name: key}), model_table.delete()):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    assert _counts(engine) == before
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.skipif(not ON_POSTGRES, reason="TRUNCATE is PostgreSQL's (set TEST_DATABASE_URL)")
@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_append_only_tables_refuse_truncate(database_url: str, table: str) -> None:
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        _fill_append_only_tables(conn)
    before = _counts(engine)

    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {table} CASCADE"))

    assert _counts(engine) == before
    engine.dispose()


@pytest.mark.skipif(ON_POSTGRES, reason="INSERT OR REPLACE is SQLite's")
@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_append_only_tables_refuse_insert_or_replace(database_url: str, table: str) -> None:
    engine = sa.create_engine(database_url)
    model_table = Base.metadata.tables[table]
    with engine.begin() as conn:
        _fill_append_only_tables(conn)
    with engine.connect() as conn:
        original = conn.execute(sa.select(model_table)).mappings().one()
    # The same key (for audit_recordings the key is the whole row), other contents.
    forged = {**original, **{c: "rewritten" for c in ("path", "body", "reason") if c in original}}
    if table in UNIQUE_KEYS:
        forged[UNIQUE_KEYS[table]] = "another"  # the same id under another key
    statement = sa.insert(model_table).prefix_with("OR REPLACE").values(**forged)

    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(statement)
    if table in UNIQUE_KEYS:
        # The log's other unique key: a row with the key of a logged one, under a new id.
        key = UNIQUE_KEYS[table]
        again = {**forged, "id": original["id"] + 1000, key: original[key]}
        with engine.begin() as conn:
            conn.execute(sa.insert(model_table).prefix_with("OR REPLACE").values(**again))

    with engine.connect() as conn:
        assert conn.execute(sa.select(model_table)).mappings().one() == original
    # New rows still go in.
    with engine.begin() as conn:
        _fill_append_only_tables(conn)
    assert _counts(engine)[table] == 2
    engine.dispose()


def test_anonymous_tally_may_only_count_up(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    tally = Base.metadata.tables["audit_anonymous"]
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            tally.insert().values(
                window_start=now,
                remote_addr="127.0.0.1",
                status=401,
                count=5,
                first_at=now,
                last_at=now,
                method="GET",
                path="/api/recordings",
                user_agent=None,
            )
        )
    with engine.begin() as conn:
        conn.execute(tally.update().values(count=tally.c.count + 1))
    for statement in (
        tally.update().values(count=1),
        tally.update().values(remote_addr="127.0.0.2"),
        tally.update().values(path="/elsewhere"),
        tally.delete(),
    ):
        with (
            pytest.raises(sa.exc.DatabaseError, match=r"count up|append-only"),
            engine.begin() as conn,
        ):
            conn.execute(statement)
    with engine.connect() as conn:
        assert conn.execute(sa.select(tally.c.count, tally.c.remote_addr)).one() == (6, "127.0.0.1")
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
    command.downgrade(alembic_config(empty_database_url), "0008")
    assert search_structures() == set()


def test_console_sessions_survive_the_staff_name_migration(empty_database_url: str) -> None:
    # 0012 rebuilds the staff table on SQLite (its name constraint has no name to drop); the
    # console sessions that reference staff.id must come through it, still pointing at their row.
    upgrade(empty_database_url, "0011")
    engine = sa.create_engine(normalise_database_url(empty_database_url))
    now = utcnow()
    try:
        with engine.begin() as conn:
            staff_id = conn.execute(
                sa.text(
                    "INSERT INTO staff (name, role, token_hash, created_at) "
                    "VALUES ('maria', 'compliance', :token, :now) RETURNING id"
                ),
                {"token": "a" * 64, "now": now},
            ).scalar_one()
            conn.execute(
                sa.text(
                    "INSERT INTO console_sessions "
                    "(session_hash, staff_id, token_hash, created_at, last_seen_at) "
                    "VALUES (:session, :staff, :token, :now, :now)"
                ),
                {"session": "b" * 64, "staff": staff_id, "token": "a" * 64, "now": now},
            )
        upgrade(empty_database_url)
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            joined = conn.execute(
                sa.text(
                    "SELECT staff.name FROM console_sessions "
                    "JOIN staff ON staff.id = console_sessions.staff_id"
                )
            ).all()
            assert joined == [("maria",)]
            # The revoked name may be given again; two active members may not share it.
            conn.execute(sa.text("UPDATE staff SET revoked_at = :now"), {"now": now})
            conn.execute(
                sa.text(
                    "INSERT INTO staff (name, role, token_hash, created_at) "
                    "VALUES ('maria', 'compliance', :token, :now)"
                ),
                {"token": "c" * 64, "now": now},
            )
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO staff (name, role, token_hash, created_at) "
                    "VALUES ('maria', 'admin', :token, :now)"
                ),
                {"token": "d" * 64, "now": now},
            )
    finally:
        engine.dispose()


def test_participants_stored_before_member_events_keep_their_rows_through_the_upgrade(
    empty_database_url: str, make_app: AppFactory
) -> None:
    # 0010 rebuilds participants on SQLite to add its columns and constraints; the participants
    # snapshotted by a 0009 service must come through it unchanged, marked as snapshots.
    upgrade(empty_database_url, "0009")
    engine = sa.create_engine(normalise_database_url(empty_database_url))
    at = sa.bindparam("at", type_=UTCDateTime())
    try:
        with engine.begin() as conn:
            recording_pk = conn.execute(
                sa.text(
                    "INSERT INTO recordings (recording_id, conference_name, api_id, file_format, "
                    "duration_s, duration_ms, start_ms, end_ms, status, attempts, archive_key, "
                    "archive_size, archive_sha256, archived_at, legal_hold, started_by, "
                    "created_at, updated_at) VALUES ('rec-0009', 'board-call', 'api-0009', "
                    "'mp3', 60, 60000, 1795000000000, 1795000060000, 'archived', 1, "
                    "'recordings/rec-0009.mp3', 1024, :sha, :at, false, 'carol', :at, :at) "
                    "RETURNING id"
                ).bindparams(at),
                {"sha": "c" * 64, "at": utcnow()},
            ).scalar_one()
            snapshots = [
                {
                    "member_id": "11",
                    "from": "+1 (415) 555-0100",
                    "to": "+14155550199",
                    "from_key": "14155550100",
                    "to_key": "14155550199",
                    "caller_name": "Maria Lopez",
                    "direction": "inbound",
                    "call_uuid": "call-uuid-11",
                    "join_time": "3",
                },
                {
                    "member_id": "12",
                    "from": "sip:alice@example.sip.plivo.com",
                    "to": "sip:board-call@example.sip.plivo.com",
                    "from_key": "alice@example.sip.plivo.com",
                    "to_key": "board-call@example.sip.plivo.com",
                    "caller_name": None,
                    "direction": "inbound",
                    "call_uuid": "call-uuid-12",
                    "join_time": "17",
                },
            ]
            ids = [
                conn.execute(
                    sa.text(
                        'INSERT INTO participants (recording_pk, member_id, "from", "to", '
                        "from_key, to_key, caller_name, direction, call_uuid, join_time) "
                        "VALUES (:recording_pk, :member_id, :from, :to, :from_key, :to_key, "
                        ":caller_name, :direction, :call_uuid, :join_time) RETURNING id"
                    ),
                    {"recording_pk": recording_pk, **snapshot},
                ).scalar_one()
                for snapshot in snapshots
            ]

        upgrade(empty_database_url)

        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM participants ORDER BY id")).mappings()
            assert [dict(row) for row in rows] == [
                {
                    "id": participant_id,
                    "recording_pk": recording_pk,
                    **snapshot,
                    "member_pk": None,
                    "joined_at": None,
                    "left_at": None,
                    "source": "snapshot",
                }
                for participant_id, snapshot in zip(ids, snapshots, strict=True)
            ]
            assert (
                conn.execute(
                    sa.text("SELECT recording_id FROM recordings WHERE id = :pk"),
                    {"pk": recording_pk},
                ).scalar_one()
                == "rec-0009"
            )
    finally:
        engine.dispose()

    app = make_app(database=empty_database_url)
    shown = app.test_client().get(
        "/api/recordings/rec-0009",
        headers={"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"},
    )
    assert shown.status_code == 200
    assert shown.json is not None
    assert shown.json["participants"] == [
        {
            # The API shows the numbers as given, not their search keys.
            **{name: value for name, value in snapshot.items() if not name.endswith("_key")},
            "joined_at": None,
            "left_at": None,
            "source": "snapshot",
            "notified_at": None,
        }
        for snapshot in snapshots
    ]
