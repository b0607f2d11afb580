"""Deleting recordings from Plivo once the archive is proven to hold them."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from tests.conftest import MP3_TAG, AppFactory, make_bucket, post_callback, token_for
from tests.fakeplivo import FakePlivo
from webhook import services
from webhook.archive import deletion
from webhook.archive.deletion import delete_from_plivo
from webhook.archive.worker import Worker
from webhook.models import Recording, Role, Status

DAY = dt.timedelta(days=1)


def content(recording_id: str) -> bytes:
    """The recording's audio: bytes that begin as an mp3 file does."""
    return MP3_TAG + recording_id.encode() * 50


def archived(app: Flask, plivo: FakePlivo, recording_id: str, ended_ago: dt.timedelta) -> None:
    """A recording that ended `ended_ago`, reported and archived."""
    ended = dt.datetime.now(dt.UTC) - ended_ago
    params = plivo.finish_recording(recording_id, content(recording_id), added_at=ended)
    assert post_callback(app.test_client(), plivo, params).status_code == 200
    assert Worker(services(app)).run(once=True) == 1


def shown(app: Flask, recording_id: str) -> dict:
    headers = {"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}
    response = app.test_client().get(f"/api/recordings/{recording_id}", headers=headers)
    assert response.status_code == 200
    return response.get_json()


def test_recording_is_deleted_from_plivo_once_verified_and_the_days_have_passed(
    make_app: AppFactory,
    plivo: FakePlivo,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app(DELETE_FROM_PLIVO_AFTER_DAYS="0.5")
    archived(app, plivo, "ended-a-day-ago", DAY)
    archived(app, plivo, "ended-an-hour-ago", dt.timedelta(hours=1))
    caplog.set_level(logging.INFO, logger="webhook")
    reads: list[str] = []
    storage = services(app).storage
    original_read = storage.read

    def read(key: str, version_id: str | None = None) -> Iterator[bytes]:
        reads.append(key)
        return original_read(key, version_id)

    monkeypatch.setattr(storage, "read", read)

    result = delete_from_plivo(services(app))

    assert (result.deleted, result.failed, result.mismatched) == (1, 0, 0)
    assert plivo.deleted_recordings == ["ended-a-day-ago"]
    assert "ended-an-hour-ago" in plivo.recordings
    assert len(reads) == 1 and reads[0].endswith("ended-a-day-ago.mp3")  # re-read first
    body = shown(app, "ended-a-day-ago")
    assert body["plivo_deleted_at"] is not None
    assert body["archive_mismatch"] is None
    assert [d["outcome"] for d in body["plivo_deletions"]] == ["deleted"]
    assert shown(app, "ended-an-hour-ago")["plivo_deleted_at"] is None
    line = next(r for r in caplog.records if r.getMessage() == "delete from Plivo: deleted")
    assert line.recording_id == "ended-a-day-ago"  # type: ignore[attr-defined]

    again = delete_from_plivo(services(app))
    assert (again.deleted, again.failed) == (0, 0)
    assert plivo.deleted_recordings == ["ended-a-day-ago"]


def test_off_by_default(make_app: AppFactory, plivo: FakePlivo) -> None:
    app = make_app()
    archived(app, plivo, "kept", 400 * DAY)
    assert delete_from_plivo(services(app)).deleted == 0
    assert plivo.deleted_recordings == []


def test_an_archived_object_that_no_longer_matches_is_never_deleted_and_is_reported(
    make_app: AppFactory, plivo: FakePlivo, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(DELETE_FROM_PLIVO_AFTER_DAYS="1")
    archived(app, plivo, "tampered", 2 * DAY)
    archived(app, plivo, "intact", 2 * DAY)
    with services(app).sessions() as session:
        key = session.scalars(
            select(Recording.archive_key).where(Recording.recording_id == "tampered")
        ).one()
    path = services(app).storage.local_path(key)
    assert path is not None
    path.write_bytes(b"not what was archived")

    result = delete_from_plivo(services(app))

    assert (result.deleted, result.mismatched) == (1, 1)
    assert plivo.deleted_recordings == ["intact"]
    assert "tampered" in plivo.recordings
    body = shown(app, "tampered")
    assert body["plivo_deleted_at"] is None
    expected = hashlib.sha256(content("tampered")).hexdigest()
    assert expected in body["archive_mismatch"]
    assert hashlib.sha256(b"not what was archived").hexdigest() in body["archive_mismatch"]
    assert [d["outcome"] for d in body["plivo_deletions"]] == ["mismatch"]
    assert any(
        r.getMessage() == "delete from Plivo: mismatch" and r.levelname == "WARNING"
        for r in caplog.records
    )

    # Never tried again, however long it waits.
    deletion_retry = deletion.RETRY_SECONDS
    try:
        deletion.RETRY_SECONDS = 0
        assert delete_from_plivo(services(app)).mismatched == 0
    finally:
        deletion.RETRY_SECONDS = deletion_retry
    assert "tampered" in plivo.recordings
    assert [d["outcome"] for d in shown(app, "tampered")["plivo_deletions"]] == ["mismatch"]


def test_a_failed_deletion_is_logged_and_retried(
    make_app: AppFactory, plivo: FakePlivo, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(DELETE_FROM_PLIVO_AFTER_DAYS="0")
    archived(app, plivo, "stubborn", dt.timedelta(minutes=5))
    plivo.delete_faults.append(500)

    first = delete_from_plivo(services(app))
    assert (first.deleted, first.failed) == (0, 1)
    assert delete_from_plivo(services(app)).failed == 0  # waits before retrying

    monkeypatch.setattr(deletion, "RETRY_SECONDS", 0)
    assert delete_from_plivo(services(app)).deleted == 1
    assert plivo.deleted_recordings == ["stubborn"]
    history = shown(app, "stubborn")["plivo_deletions"]
    assert [d["outcome"] for d in history] == ["failed", "deleted"]
    assert "500" in history[0]["error"]


def retained_app(make_app: AppFactory, s3_endpoint: str) -> tuple[Flask, str]:
    """An app that deletes from Plivo after a day, archiving under a 30-day governance lock into
    a new Object Lock bucket; and the bucket."""
    locked = make_bucket(s3_endpoint, object_lock=True)
    env = {"RETENTION_DAYS": "30", "OBJECT_LOCK_MODE": "GOVERNANCE"}
    return make_app(f"s3://{locked}", DELETE_FROM_PLIVO_AFTER_DAYS="1", **env), locked


def test_with_retention_configured_only_a_locked_object_is_deleted(
    make_app: AppFactory, plivo: FakePlivo, s3_endpoint: str, tmp_path: Path
) -> None:
    app, _bucket = retained_app(make_app, s3_endpoint)
    archived(app, plivo, "locked", 2 * DAY)
    # Archived before retention was configured: no lock, so never deleted automatically.
    unlocked_app = make_app(f"file://{tmp_path}/old-archive")
    archived(unlocked_app, plivo, "unlocked", 2 * DAY)

    result = delete_from_plivo(services(app))

    assert result.deleted == 1
    assert plivo.deleted_recordings == ["locked"]
    assert "unlocked" in plivo.recordings


def test_a_lock_s3_no_longer_holds_or_an_unreadable_archive_is_refused_and_kept_on_plivo(
    make_app: AppFactory, plivo: FakePlivo, s3_endpoint: str, s3: Any
) -> None:
    app, locked = retained_app(make_app, s3_endpoint)
    archived(app, plivo, "lock-shortened", 2 * DAY)
    archived(app, plivo, "object-gone", 2 * DAY)
    # The database still says retained for 30 days; S3 is what counts. Someone with the
    # governance bypass shortened the lock to the past: not safe to delete from Plivo.
    shortened = shown(app, "lock-shortened")
    s3.put_object_retention(
        Bucket=locked,
        Key=shortened["archive"]["key"],
        VersionId=shortened["archive"]["version_id"],
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": dt.datetime.now(dt.UTC) - DAY},
        BypassGovernanceRetention=True,
    )
    assert shown(app, "lock-shortened")["retain_until"] is not None
    with services(app).sessions.begin() as session:
        gone = session.scalars(select(Recording).where(Recording.recording_id == "object-gone"))
        gone.one().archive_key = "nowhere/object-gone.mp3"

    result = delete_from_plivo(services(app))

    assert (result.deleted, result.refused, result.mismatched) == (0, 2, 0)
    assert plivo.deleted_recordings == []
    reasons = {
        name: [(d["outcome"], d["error"]) for d in shown(app, name)["plivo_deletions"]]
        for name in ("lock-shortened", "object-gone")
    }
    assert reasons["lock-shortened"][0][0] == "refused"
    assert "no Object Lock retention" in reasons["lock-shortened"][0][1]
    assert reasons["object-gone"][0][0] == "refused"
    assert "archive not readable" in reasons["object-gone"][0][1]
    assert shown(app, "lock-shortened")["plivo_deleted_at"] is None


def test_a_running_worker_deletes_a_recording_soon_after_it_becomes_eligible(
    make_app: AppFactory, plivo: FakePlivo, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert deletion.DELETE_EVERY_SECONDS <= 60
    monkeypatch.setattr("webhook.archive.worker.DELETE_EVERY_SECONDS", 1)
    app = make_app(DELETE_FROM_PLIVO_AFTER_DAYS=str(3 / 86400))  # three seconds, in days
    ended = time.time()
    archived(app, plivo, "soon", dt.timedelta(0))
    stop = threading.Event()
    worker = threading.Thread(target=Worker(services(app), stop).run, kwargs={"poll_seconds": 0.1})
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while "soon" not in plivo.deleted_recordings and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)
    assert plivo.deleted_recordings == ["soon"]
    with services(app).sessions() as session:
        recording = session.scalars(select(Recording)).one()
    assert recording.status == Status.ARCHIVED
    assert recording.plivo_deleted_at is not None
    waited = recording.plivo_deleted_at.timestamp() - ended
    assert 3 <= waited < 3 + 1 + 1, waited  # eligible after 3 s, taken within the next turn
