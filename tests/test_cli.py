"""The `webhook` command: database, staff tokens, worker, requeue, reconcile and verify."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from click.testing import Result
from flask import Flask
from flask.testing import FlaskCliRunner
from sqlalchemy import func, select

from tests.conftest import MP3_TAG, make_settings, mp3_bytes, post_callback, token_for
from tests.fakeplivo import FakePlivo
from webhook import create_app, services
from webhook.archive.worker import Worker
from webhook.cli import cli
from webhook.db import transaction
from webhook.models import Recording, Role, Staff, Status


def invoke(runner: FlaskCliRunner, *args: str) -> Result:
    """Run `webhook ARGS…` against the test app.

    The commands live on the `webhook` console script's group, not on `app.cli`, so the group is
    passed explicitly; the runner still hands it the test app.
    """
    return runner.invoke(cli, args=list(args))


def last_line(result: Result) -> str:
    return result.output.strip().splitlines()[-1]


def row(app: Flask, recording_id: str) -> Recording:
    with services(app).sessions() as session:
        return session.scalars(
            select(Recording).where(Recording.recording_id == recording_id)
        ).one()


def recording_count(app: Flask) -> int:
    with services(app).sessions() as session:
        return session.scalar(select(func.count()).select_from(Recording)) or 0


def queue(app: Flask, plivo: FakePlivo, recording_id: str, content: bytes) -> None:
    params = plivo.finish_recording(recording_id, content)
    assert post_callback(app.test_client(), plivo, params).status_code == 200


def archive(app: Flask, plivo: FakePlivo, audio: dict[str, bytes]) -> None:
    for recording_id, content in audio.items():
        queue(app, plivo, recording_id, content)
    assert Worker(services(app)).run(once=True) == len(audio)


def fail(app: Flask, *recording_ids: str) -> None:
    with transaction(services(app).sessions) as session:
        session.execute(
            sa.update(Recording)
            .where(Recording.recording_id.in_(recording_ids))
            .values(status=Status.FAILED, attempts=3, next_attempt_at=None, last_error="HTTP 404")
        )


@pytest.fixture
def worker_command_isolated() -> Iterator[None]:
    """`webhook worker` installs signal handlers and stdout logging for its process: undo both."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    logger = logging.getLogger("webhook")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


# --- db upgrade ---------------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema_on_a_fresh_sqlite_file_and_is_idempotent(
    tmp_path: Path, plivo
) -> None:
    path = tmp_path / "fresh.sqlite3"
    app = create_app(
        {
            "TESTING": True,
            "SETTINGS": make_settings(f"sqlite:///{path}", f"file://{tmp_path}/archive", plivo),
        }
    )
    runner = app.test_cli_runner()
    try:
        first = invoke(runner, "db", "upgrade")
        assert first.exit_code == 0, first.output
        assert "head" in first.output
        engine = sa.create_engine(f"sqlite:///{path}")
        try:
            tables = set(sa.inspect(engine).get_table_names())
            assert {"alembic_version", "recordings", "participants", "staff"} <= tables
            with engine.connect() as conn:
                version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            assert len(version) == 1

            second = invoke(runner, "db", "upgrade")
            assert second.exit_code == 0, second.output
            with engine.connect() as conn:
                again = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            assert again == version
        finally:
            engine.dispose()
        # The schema works: a token can be made in it.
        added = invoke(runner, "staff", "add", "first", "--role", "admin")
        assert added.exit_code == 0, added.output
    finally:
        services(app).engine.dispose()


def test_db_upgrade_on_the_migrated_test_database_changes_nothing(runner) -> None:
    result = invoke(runner, "db", "upgrade")
    assert result.exit_code == 0, result.output


# --- staff --------------------------------------------------------------------------------------


def test_staff_add_prints_a_working_token_alone_on_the_last_line(app, runner, client) -> None:
    result = invoke(runner, "staff", "add", "carol", "--role", "compliance")

    assert result.exit_code == 0, result.output
    token = result.output.splitlines()[-1]
    assert result.output.endswith(f"\n{token}\n")
    assert token.isprintable() and token == token.strip() and " " not in token
    assert len(token) >= 32
    ok = client.get("/api/recordings", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.get_json()
    assert ok.get_json()["recordings"] == []
    # Only the hash is kept.
    with services(app).sessions() as session:
        staff = session.scalars(select(Staff).where(Staff.name == "carol")).one()
    assert staff.role == "compliance"
    assert staff.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in staff.token_hash


def test_staff_token_carries_only_its_role(runner, client) -> None:
    token = last_line(invoke(runner, "staff", "add", "reader", "--role", "compliance"))
    audit = client.get("/api/audit", headers={"Authorization": f"Bearer {token}"})
    assert audit.status_code == 403


def test_staff_add_twice_with_the_same_name_fails(app, runner) -> None:
    assert invoke(runner, "staff", "add", "dave", "--role", "operator").exit_code == 0

    again = invoke(runner, "staff", "add", "dave", "--role", "admin")

    assert again.exit_code != 0
    assert "exists" in again.output
    with services(app).sessions() as session:
        assert session.scalars(select(Staff.role).where(Staff.name == "dave")).all() == ["operator"]


@pytest.mark.parametrize(
    "args",
    [
        ("staff", "add", "eve", "--role", "superuser"),
        ("staff", "add", "eve"),
        ("staff", "add", "", "--role", "admin"),
        ("staff", "add", "x" * 65, "--role", "admin"),
    ],
)
def test_staff_add_refuses_bad_arguments(app, runner, args) -> None:
    result = invoke(runner, *args)
    assert result.exit_code == 2, result.output
    with services(app).sessions() as session:
        assert session.scalar(select(func.count()).select_from(Staff)) == 0


def test_staff_list_shows_names_roles_and_state(runner) -> None:
    invoke(runner, "staff", "add", "zoe", "--role", "admin")
    invoke(runner, "staff", "add", "amy", "--role", "compliance")
    invoke(runner, "staff", "revoke", "zoe")

    result = invoke(runner, "staff", "list")

    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["amy", "compliance"], ["zoe", "admin"]]
    assert "active" in lines[0]
    assert "revoked" in lines[1]


def test_staff_revoke_makes_the_token_fail(runner, client) -> None:
    token = last_line(invoke(runner, "staff", "add", "frank", "--role", "compliance"))
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/recordings", headers=headers).status_code == 200

    result = invoke(runner, "staff", "revoke", "frank")

    assert result.exit_code == 0, result.output
    assert client.get("/api/recordings", headers=headers).status_code == 401
    again = invoke(runner, "staff", "revoke", "frank")
    assert again.exit_code != 0
    assert invoke(runner, "staff", "revoke", "nobody").exit_code != 0


def test_staff_rotate_issues_a_new_token_and_the_old_one_stops_working(runner, client) -> None:
    old = last_line(invoke(runner, "staff", "add", "gina", "--role", "compliance"))

    result = invoke(runner, "staff", "rotate", "gina")

    assert result.exit_code == 0, result.output
    new = last_line(result)
    assert new != old and new.startswith("whk_")
    assert client.get(
        "/api/recordings", headers={"Authorization": f"Bearer {old}"}
    ).status_code == (401)
    assert client.get(
        "/api/recordings", headers={"Authorization": f"Bearer {new}"}
    ).status_code == (200)
    listed = invoke(runner, "staff", "list").output.strip().splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["gina", "compliance"]] * 2
    assert "revoked" in listed[0] and "active" in listed[1]
    assert invoke(runner, "staff", "rotate", "nobody").exit_code == 1


def test_a_revoked_name_can_be_given_again_but_never_twice_at_once(app, runner, client) -> None:
    invoke(runner, "staff", "add", "hal", "--role", "admin")
    invoke(runner, "staff", "revoke", "hal")

    again = invoke(runner, "staff", "add", "hal", "--role", "compliance")

    assert again.exit_code == 0, again.output
    headers = {"Authorization": f"Bearer {last_line(again)}"}
    assert client.get("/api/recordings", headers=headers).status_code == 200
    assert client.get("/api/audit", headers=headers).status_code == 403  # the new role only
    # The database itself keeps one active holder per name, whatever the caller does.
    with pytest.raises(sa.exc.IntegrityError), transaction(services(app).sessions) as session:
        session.add(Staff(name="hal", role="admin", token_hash="0" * 64))


# --- worker -------------------------------------------------------------------------------------


def test_worker_once_archives_what_is_queued_and_prints_the_count(
    app, runner, plivo, worker_command_isolated
) -> None:
    audio = {"cli-1": mp3_bytes(3000), "cli-2": mp3_bytes(4000)}
    for recording_id, content in audio.items():
        queue(app, plivo, recording_id, content)

    result = invoke(runner, "worker", "--once")

    assert result.exit_code == 0, result.output
    assert last_line(result) == "archive worker ran 2 job(s)"
    for recording_id, content in audio.items():
        recording = row(app, recording_id)
        assert recording.status == Status.ARCHIVED
        path = services(app).storage.local_path(str(recording.archive_key))
        assert path is not None and path.read_bytes() == content

    again = invoke(runner, "worker", "--once")
    assert last_line(again) == "archive worker ran 0 job(s)"


def test_worker_refuses_to_start_when_retention_is_asked_but_bucket_cannot_lock(
    database_url: str, plivo, bucket: str, s3, worker_command_isolated
) -> None:
    settings = make_settings(
        database_url,
        f"s3://{bucket}",
        plivo,
        RETENTION_DAYS="30",
        OBJECT_LOCK_MODE="COMPLIANCE",
    )
    app = create_app({"TESTING": True, "SETTINGS": settings})
    try:
        queue(app, plivo, "cli-unlocked", MP3_TAG + b"must not be stored without retention")

        result = invoke(app.test_cli_runner(), "worker", "--once")

        assert result.exit_code == 1
        assert "Object Lock" in result.output
        assert row(app, "cli-unlocked").status == Status.PENDING
        assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
        assert plivo.media_requests == []
    finally:
        services(app).engine.dispose()


# --- requeue ------------------------------------------------------------------------------------


def test_requeue_one_recording_puts_it_back_with_fresh_attempts(app, runner, plivo) -> None:
    queue(app, plivo, "rq-1", MP3_TAG + b"one")
    queue(app, plivo, "rq-2", MP3_TAG + b"two")
    fail(app, "rq-1", "rq-2")

    result = invoke(runner, "requeue", "rq-1")

    assert result.exit_code == 0, result.output
    assert "requeued 1 recording(s)" in result.output
    recording = row(app, "rq-1")
    assert recording.status == Status.PENDING
    assert recording.attempts == 0
    assert recording.next_attempt_at is not None
    assert row(app, "rq-2").status == Status.FAILED
    # Back on the queue for real: the worker archives it.
    assert Worker(services(app)).run(once=True) == 1
    assert row(app, "rq-1").status == Status.ARCHIVED


def test_requeue_failed_puts_every_failed_recording_back(app, runner, plivo) -> None:
    for name in ("rqf-1", "rqf-2", "rqf-3"):
        queue(app, plivo, name, name.encode())
    fail(app, "rqf-1", "rqf-2")

    result = invoke(runner, "requeue", "--failed")

    assert result.exit_code == 0, result.output
    assert "requeued 2 recording(s)" in result.output
    for name in ("rqf-1", "rqf-2"):
        recording = row(app, name)
        assert recording.status == Status.PENDING
        assert recording.attempts == 0
    assert Worker(services(app)).run(once=True) == 3


def test_requeue_refuses_an_archived_recording(app, runner, plivo) -> None:
    archive(app, plivo, {"rq-done": MP3_TAG + b"done"})

    result = invoke(runner, "requeue", "rq-done")

    assert result.exit_code == 1
    assert "rq-done" in result.output
    assert row(app, "rq-done").status == Status.ARCHIVED


@pytest.mark.parametrize("args", [(), ("rq-x", "--failed")])
def test_requeue_needs_exactly_one_of_id_or_failed(runner, args) -> None:
    result = invoke(runner, "requeue", *args)
    assert result.exit_code == 2
    assert "RECORDING_ID or --failed" in result.output


# --- reconcile ----------------------------------------------------------------------------------


def test_reconcile_queues_what_plivo_has_and_the_archive_lacks(app, runner, plivo) -> None:
    known = [f"known-{n}" for n in range(3)]
    lost = [f"lost-{n:02d}" for n in range(25)]
    for recording_id in known:
        queue(app, plivo, recording_id, MP3_TAG + b"known")
    for recording_id in lost:
        plivo.finish_recording(recording_id, MP3_TAG + recording_id.encode(), duration_ms=4000)

    result = invoke(runner, "reconcile")

    assert result.exit_code == 0, result.output
    assert last_line(result) == (
        "reconcile: 28 recording(s) on Plivo, 25 queued, 3 already known, 0 skipped"
    )
    assert recording_count(app) == 28
    recording = row(app, "lost-07")
    assert recording.status == Status.PENDING
    assert recording.duration_ms == 4000
    assert recording.record_url == plivo.media_url("lost-07")
    # 28 recordings at 20 a page: the second page was asked for.
    offsets = [
        payload.get("offset")
        for method, path, payload in plivo.calls
        if method == "GET" and path.endswith("/Recording/")
    ]
    assert offsets == ["0", "20"]

    again = invoke(runner, "reconcile")
    assert again.exit_code == 0, again.output
    assert last_line(again) == (
        "reconcile: 28 recording(s) on Plivo, 0 queued, 28 already known, 0 skipped"
    )
    assert recording_count(app) == 28

    # What it queued is archived like any callback's recording.
    assert Worker(services(app)).run(once=True) == 28
    assert row(app, "lost-07").archive_sha256 == hashlib.sha256(MP3_TAG + b"lost-07").hexdigest()


def test_reconcile_queues_a_recording_started_here_whose_callback_was_lost(
    app, runner, client, plivo
) -> None:
    plivo.add_conference("board")
    started = client.post(
        "/api/conferences/board/recording",
        headers={"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"},
    )
    assert started.status_code == 201, started.get_json()
    recording_id = started.get_json()["recording_id"]
    assert row(app, recording_id).status == Status.RECORDING
    plivo.finish_recording(recording_id, MP3_TAG + b"board audio")

    result = invoke(runner, "reconcile")

    assert result.exit_code == 0, result.output
    assert "1 queued" in last_line(result)
    recording = row(app, recording_id)
    assert recording.status == Status.PENDING
    assert recording.conference_name == "board"
    assert recording_count(app) == 1


def test_reconcile_leaves_recordings_that_are_not_conference_recordings(app, runner, plivo) -> None:
    plivo.finish_recording("conf-1", MP3_TAG + b"conference")
    plivo.finish_recording("call-1", MP3_TAG + b"a call recording")
    plivo.recordings["call-1"]["recording_type"] = "call"

    result = invoke(runner, "reconcile")

    assert result.exit_code == 0, result.output
    assert last_line(result) == (
        "reconcile: 2 recording(s) on Plivo, 1 queued, 0 already known, 1 skipped"
    )
    assert row(app, "conf-1").status == Status.PENDING
    assert recording_count(app) == 1


def test_reconcile_since_limits_to_recent_recordings(app, runner, plivo) -> None:
    plivo.finish_recording("recent", MP3_TAG + b"recent")
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")

    future = invoke(runner, "reconcile", "--since", tomorrow)
    assert future.exit_code == 0, future.output
    assert "0 recording(s) on Plivo, 0 queued" in last_line(future)
    assert recording_count(app) == 0

    past = invoke(runner, "reconcile", "--since", "2020-01-01")
    assert past.exit_code == 0, past.output
    assert "1 recording(s) on Plivo, 1 queued" in last_line(past)


@pytest.mark.parametrize("since", ["yesterday", "2023-13-45", "not a date"])
def test_reconcile_since_garbage_is_a_usage_error(app, runner, plivo, since) -> None:
    plivo.finish_recording("untouched", MP3_TAG + b"x")

    result = invoke(runner, "reconcile", "--since", since)

    assert result.exit_code == 2
    assert "--since" in result.output
    assert recording_count(app) == 0
    assert plivo.calls == []


def test_reconcile_reports_plivo_failure(app, runner, plivo) -> None:
    plivo.finish_recording("unreachable", MP3_TAG + b"x")
    plivo.api_faults.append(401)

    result = invoke(runner, "reconcile")

    assert result.exit_code == 1
    assert "Plivo" in result.output
    assert recording_count(app) == 0


def list_calls(plivo: FakePlivo) -> list[dict]:
    """The query of every Recording list request the service made, in order."""
    return [
        payload
        for method, path, payload in plivo.calls
        if method == "GET" and path.endswith("/Recording/")
    ]


def test_fake_plivo_lists_only_windows_plivo_accepts(plivo) -> None:
    now = dt.datetime.now(dt.UTC)
    plivo.finish_recording("old", b"old", added_at=now - dt.timedelta(days=10))
    plivo.finish_recording("new", b"new", added_at=now - dt.timedelta(days=2))
    url = f"{plivo.url}/v1/Account/{plivo.auth_id}/Recording/"
    auth = (plivo.auth_id, plivo.auth_token)

    def listing(**params: str) -> requests.Response:
        return requests.get(url, params=params, auth=auth, timeout=10)

    default = listing()
    assert default.status_code == 200
    assert [r["recording_id"] for r in default.json()["objects"]] == ["new"]
    day = "%Y-%m-%d %H:%M:%S"
    start = now - dt.timedelta(days=31)
    too_long = listing(add_time__gte=start.strftime(day))
    assert too_long.status_code == 400
    ranged = listing(
        add_time__gte=start.strftime(day),
        add_time__lt=(start + dt.timedelta(days=30)).strftime(day),
    )
    assert ranged.status_code == 200
    assert [r["recording_id"] for r in ranged.json()["objects"]] == ["new", "old"]


def test_reconcile_since_pages_through_windows_and_recovers_old_and_recent_losses(
    app, runner, plivo
) -> None:
    now = dt.datetime.now(dt.UTC)
    plivo.finish_recording("sixty-days", b"60", added_at=now - dt.timedelta(days=60))
    plivo.finish_recording("yesterday", b"1", added_at=now - dt.timedelta(days=1))
    plivo.finish_recording("too-old", b"80", added_at=now - dt.timedelta(days=80))

    default = invoke(runner, "reconcile")
    assert default.exit_code == 0, default.output
    assert "1 recording(s) on Plivo, 1 queued" in last_line(default)
    assert recording_count(app) == 1  # Plivo's default list is its last 7 days only

    since = (now - dt.timedelta(days=75)).strftime("%Y-%m-%dT%H:%M:%S")
    result = invoke(runner, "reconcile", "--since", since)

    assert result.exit_code == 0, result.output
    assert last_line(result) == (
        "reconcile: 2 recording(s) on Plivo, 1 queued, 1 already known, 0 skipped"
    )
    assert row(app, "sixty-days").status == Status.PENDING
    assert row(app, "yesterday").status == Status.PENDING
    assert recording_count(app) == 2
    windows = [
        (
            dt.datetime.fromisoformat(q["add_time__gte"]).replace(tzinfo=dt.UTC),
            dt.datetime.fromisoformat(q["add_time__lt"]).replace(tzinfo=dt.UTC),
        )
        for q in list_calls(plivo)[1:]
    ]
    assert len(windows) == 3
    assert windows[0][0] == dt.datetime.fromisoformat(since).replace(tzinfo=dt.UTC)
    for (_, end), (next_start, _) in itertools.pairwise(windows):
        assert end == next_start  # oldest first, no gap
    assert all(end - start <= dt.timedelta(days=30) for start, end in windows)
    assert windows[-1][1] >= now


def test_reconcile_since_interrupted_resumes_where_it_stopped(app, runner, plivo) -> None:
    now = dt.datetime.now(dt.UTC)
    plivo.finish_recording("sixty-days", b"60", added_at=now - dt.timedelta(days=60))
    plivo.finish_recording("yesterday", b"1", added_at=now - dt.timedelta(days=1))
    since = (now - dt.timedelta(days=75)).strftime("%Y-%m-%dT%H:%M:%S")
    plivo.api_faults.extend(["pass", 400])  # the second window fails

    broken = invoke(runner, "reconcile", "--since", since)

    assert broken.exit_code == 1
    assert "run the same command again to resume" in broken.output
    assert row(app, "sixty-days").status == Status.PENDING
    assert recording_count(app) == 1
    first_window_end = list_calls(plivo)[0]["add_time__lt"]
    plivo.calls.clear()

    again = invoke(runner, "reconcile", "--since", since)

    assert again.exit_code == 0, again.output
    assert "reconcile: 1 recording(s) on Plivo, 1 queued, 0 already known, 0 skipped" in (
        again.output
    )
    assert "resumed at" in again.output
    calls = list_calls(plivo)
    assert calls[0]["add_time__gte"] == first_window_end  # not the first window again
    assert len(calls) == 2
    assert recording_count(app) == 2

    # Once finished, the same command is a fresh run over all of it.
    plivo.calls.clear()
    fresh = invoke(runner, "reconcile", "--since", since)
    assert fresh.exit_code == 0, fresh.output
    assert "2 recording(s) on Plivo, 0 queued, 2 already known" in last_line(fresh)
    assert len(list_calls(plivo)) == 3


# --- verify -------------------------------------------------------------------------------------


def test_verify_passes_on_intact_local_archive(app, runner, plivo) -> None:
    archive(app, plivo, {"v-1": mp3_bytes(1000), "v-2": mp3_bytes(2000)})

    result = invoke(runner, "verify")

    assert result.exit_code == 0, result.output
    assert last_line(result) == "verify: 2 object(s) checked, 0 mismatch(es)"


def test_verify_finds_an_overwritten_local_file(app, runner, plivo) -> None:
    archive(app, plivo, {"v-ok": mp3_bytes(1000), "v-bad": mp3_bytes(1000)})
    path = services(app).storage.local_path(str(row(app, "v-bad").archive_key))
    assert path is not None
    path.write_bytes(os.urandom(1000))  # same size, other bytes

    result = invoke(runner, "verify")

    assert result.exit_code == 1
    mismatches = [line for line in result.output.splitlines() if line.startswith("MISMATCH")]
    assert len(mismatches) == 1
    assert "v-bad" in mismatches[0]
    assert last_line(result) == "verify: 2 object(s) checked, 1 mismatch(es)"


def test_verify_reports_a_missing_local_file(app, runner, plivo) -> None:
    archive(app, plivo, {"v-gone": MP3_TAG + b"gone"})
    path = services(app).storage.local_path(str(row(app, "v-gone").archive_key))
    assert path is not None
    path.unlink()

    result = invoke(runner, "verify")

    assert result.exit_code == 1
    assert any(line.startswith("MISSING v-gone") for line in result.output.splitlines()), (
        result.output
    )


def test_verify_finds_an_overwritten_s3_object(
    database_url: str, plivo, s3, bucket: str, tmp_path: Path
) -> None:
    app = create_app(
        {"TESTING": True, "SETTINGS": make_settings(database_url, f"s3://{bucket}/arch", plivo)}
    )
    try:
        runner = app.test_cli_runner()
        archive(app, plivo, {"s3-ok": mp3_bytes(1500), "s3-bad": mp3_bytes(1500)})
        clean = invoke(runner, "verify")
        assert clean.exit_code == 0, clean.output
        assert "0 mismatch(es)" in last_line(clean)

        key = str(row(app, "s3-bad").archive_key)
        assert key.startswith("arch/recordings/")
        s3.put_object(Bucket=bucket, Key=key, Body=b"tampered")

        result = invoke(runner, "verify")

        assert result.exit_code == 1
        mismatches = [line for line in result.output.splitlines() if line.startswith("MISMATCH")]
        assert len(mismatches) == 1
        assert "s3-bad" in mismatches[0]
        assert "1 mismatch(es)" in last_line(result)
    finally:
        services(app).engine.dispose()


# --- errors are one line and a hint -------------------------------------------------------------


def run_webhook(*args: str, **env: str) -> Any:
    """The installed `webhook` command, in a clean environment plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "DATABASE"))}
    return subprocess.run(
        [str(Path(sys.executable).parent / "webhook"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_misconfiguration_is_one_line_and_a_hint_not_a_traceback(tmp_path: Path) -> None:
    result = run_webhook("staff", "list", ARCHIVE_URL="my-bucket")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ARCHIVE_URL 'my-bucket' has no scheme; write s3://my-bucket")
    assert lines[1].startswith("Hint:")
    assert len(lines) == 2 and "Traceback" not in result.stderr


def test_an_unmigrated_database_says_run_db_upgrade_and_debug_shows_the_trace(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/empty.sqlite3"
    result = run_webhook("staff", "list", DATABASE_URL=url, ARCHIVE_URL=f"file://{tmp_path}/a")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "Error: the database is not migrated to this version of the service"
    )
    assert "run `webhook db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_webhook(
        "--debug", "staff", "list", DATABASE_URL=url, ARCHIVE_URL=f"file://{tmp_path}/a"
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_an_unreachable_database_is_one_line_naming_database_url(tmp_path: Path) -> None:
    result = run_webhook(
        "staff",
        "list",
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/none",
        ARCHIVE_URL=f"file://{tmp_path}/a",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: database error: OperationalError")
    assert "DATABASE_URL" in result.stderr and "Traceback" not in result.stderr


def test_the_worker_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/empty.sqlite3"
    result = run_webhook("worker", DATABASE_URL=url, ARCHIVE_URL=f"file://{tmp_path}/a")
    assert result.returncode == 1
    assert "has no migrations applied" in result.stderr
    assert "run `webhook db upgrade`" in result.stderr


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = run_webhook("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"webhook {version('webhook')}"


GC_PROBE = """
import gc, json, sys
starts = []
gc.callbacks.append(lambda phase, info: phase == "start" and starts.append(info["generation"]))
if sys.argv[1] == "command":
    import webhook
    sys.argv = ["webhook", "--help"]
    try:
        webhook.main()
    except SystemExit:
        pass
else:
    import webhook.cli
state = {"collections": len(starts), "frozen": gc.get_freeze_count(), "on": gc.isenabled()}
print(json.dumps(state), file=sys.stderr)
"""


def test_the_command_imports_its_modules_with_the_collector_off_then_freezes_them() -> None:
    """`webhook` (`webhook.main`) imports the service without a garbage collection and keeps what
    it imported out of later ones; the same import as a library collects time and again."""
    import json

    def probe(how: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", GC_PROBE, how],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        state: dict[str, Any] = json.loads(done.stderr.strip().splitlines()[-1])
        return state

    command, library = probe("command"), probe("library")
    assert library["collections"] > 100 and library["frozen"] == 0
    # The few collections left are `--help`'s own, after the collector is back on.
    assert command["collections"] * 10 < library["collections"]
    assert command["frozen"] > 50_000 and command["on"] is True
