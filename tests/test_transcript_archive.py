"""Transcripts in the archive beside their audio (retention, legal hold, verify), asked for when
recordings start, and fetched or ordered from Plivo later."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update

from tests.conftest import (
    MP3_TAG,
    AppFactory,
    make_bucket,
    mp3_bytes,
    post_callback,
    post_transcription,
    token_for,
)
from tests.fakeplivo import FakePlivo
from webhook import services
from webhook.archive.storage import StorageError
from webhook.archive.transcripts import transcript_key
from webhook.archive.worker import Worker
from webhook.cli import cli
from webhook.config import ConfigError, load
from webhook.db import transaction
from webhook.models import Recording, Role, Status, Transcript

TEXT = "Speaker 0: a guaranteed return, I promise.\nSpeaker 1: Ça va, 東京."


def queue(app: Flask, plivo: FakePlivo, recording_id: str, audio: bytes = MP3_TAG) -> None:
    params = plivo.finish_recording(recording_id, audio)
    assert post_callback(app.test_client(), plivo, params).status_code == 200


def transcribe(
    app: Flask, plivo: FakePlivo, recording_id: str, text: str = TEXT, **kw: Any
) -> None:
    params = plivo.transcribe(recording_id, text, **kw)
    answer = post_transcription(app.test_client(), plivo, params)
    assert answer.status_code == 200, answer.get_json()


def transcript(app: Flask, recording_id: str) -> Transcript:
    with services(app).sessions() as session:
        return session.scalars(
            select(Transcript).where(Transcript.recording_id == recording_id)
        ).one()


def recording(app: Flask, recording_id: str) -> Recording:
    with services(app).sessions() as session:
        return session.scalars(
            select(Recording).where(Recording.recording_id == recording_id)
        ).one()


def archived_bytes(app: Flask, key: str) -> bytes:
    return b"".join(services(app).storage.read(key))


# --- archived beside the audio -------------------------------------------------------------------


def test_transcript_is_archived_beside_the_audio_whichever_came_first(app, plivo) -> None:
    transcribe(app, plivo, "first")  # before the recording's callback
    queue(app, plivo, "first")
    queue(app, plivo, "second")
    assert Worker(services(app)).run(once=True) == 2
    transcribe(app, plivo, "second", "Speaker 0: late words")  # after the audio was archived
    assert transcript(app, "second").archived_at is None
    Worker(services(app)).run(once=True)  # no job, but it sweeps late transcripts

    for recording_id in ("first", "second"):
        audio, kept = recording(app, recording_id), transcript(app, recording_id)
        assert audio.status == Status.ARCHIVED
        assert kept.archive_key == transcript_key(str(audio.archive_key))
        assert kept.archive_key.endswith(f"/{recording_id}.transcript.json")
        assert kept.archive_key.rsplit("/", 1)[0] == str(audio.archive_key).rsplit("/", 1)[0]
        stored = archived_bytes(app, kept.archive_key)
        assert hashlib.sha256(stored).hexdigest() == kept.sha256
        assert kept.archive_size == len(stored)
    document = json.loads(archived_bytes(app, transcript(app, "first").archive_key))
    assert document["transcription"] == TEXT
    assert document["recording_id"] == "first"
    assert document["plivo"]["transcription_rate"] == "0.05"
    assert document["plivo"]["source"] == "callback"


def test_a_failing_transcript_write_neither_fails_nor_delays_the_audio(
    app, plivo, monkeypatch
) -> None:
    storage = services(app).storage
    real_put = storage.put

    def put(key: str, *args: Any, **kwargs: Any) -> Any:
        if key.endswith(".transcript.json"):
            raise StorageError("archive refused the transcript")
        return real_put(key, *args, **kwargs)

    monkeypatch.setattr(storage, "put", put)
    transcribe(app, plivo, "rec")
    queue(app, plivo, "rec")
    assert Worker(services(app)).run(once=True) == 1
    assert recording(app, "rec").status == Status.ARCHIVED
    failed = transcript(app, "rec")
    assert failed.archived_at is None
    assert "archive refused the transcript" in str(failed.archive_error)
    assert failed.archive_next_attempt_at is not None

    monkeypatch.setattr(storage, "put", real_put)
    with transaction(services(app).sessions) as session:  # its retry is due
        session.execute(update(Transcript).values(archive_next_attempt_at=None))
    Worker(services(app)).run(once=True)
    kept = transcript(app, "rec")
    assert kept.archived_at is not None
    assert kept.archive_error is None


def test_an_error_transcript_is_archived_and_the_audio_too(app, plivo, auth) -> None:
    queue(app, plivo, "too-long")
    error = "Recording duration too long for transcription"
    transcribe(app, plivo, "too-long", "", error=error)
    assert Worker(services(app)).run(once=True) == 1
    shown = app.test_client().get("/api/recordings/too-long", headers=auth(Role.COMPLIANCE)).json
    assert shown["status"] == "archived"
    assert shown["transcript"]["status"] == "error"
    assert shown["transcript"]["error"] == error
    assert shown["transcript"]["archived_at"] is not None
    document = json.loads(archived_bytes(app, transcript(app, "too-long").archive_key))
    assert document["error"] == error


def test_verify_checks_transcripts_too(app, plivo, runner, tmp_path: Path) -> None:
    queue(app, plivo, "checked")
    transcribe(app, plivo, "checked")
    Worker(services(app)).run(once=True)
    result = runner.invoke(cli, ["verify"])
    assert result.exit_code == 0, result.output
    assert "2 object(s) checked, 0 mismatch(es)" in result.output
    path = services(app).storage.local_path(str(transcript(app, "checked").archive_key))
    assert path is not None
    path.write_bytes(path.read_bytes().replace(b"guaranteed", b"GUARANTEED"))
    result = runner.invoke(cli, ["verify"])
    assert result.exit_code == 1
    assert "MISMATCH checked (transcript)" in result.output


@pytest.fixture
def locked_app(make_app: AppFactory, s3_endpoint: str) -> tuple[Flask, str]:
    bucket = make_bucket(s3_endpoint, object_lock=True)
    return make_app(f"s3://{bucket}/p", RETENTION_DAYS="30", OBJECT_LOCK_MODE="GOVERNANCE"), bucket


def test_transcript_has_the_audios_retention_and_legal_hold(locked_app, plivo, s3) -> None:
    app, bucket = locked_app
    for recording_id in ("held", "held-later"):
        queue(app, plivo, recording_id, mp3_bytes(1000))
    transcribe(app, plivo, "held")
    assert Worker(services(app)).run(once=True) == 2
    audio, kept = recording(app, "held"), transcript(app, "held")
    head = s3.head_object(Bucket=bucket, Key=kept.archive_key, VersionId=kept.archive_version_id)
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] == audio.retain_until
    assert head["ServerSideEncryption"] == "AES256"

    admin = {"Authorization": f"Bearer {token_for(app, Role.ADMIN)}"}
    client = app.test_client()
    for recording_id in ("held", "held-later"):
        placed = client.put(
            f"/api/recordings/{recording_id}/legal-hold",
            json={"on": True, "reason": "inquiry"},
            headers=admin,
        )
        assert placed.status_code == 200, placed.json

    def hold(row: Transcript) -> str:
        answer = s3.get_object_legal_hold(
            Bucket=bucket, Key=row.archive_key, VersionId=row.archive_version_id
        )
        return str(answer["LegalHold"]["Status"])

    assert hold(kept) == "ON"
    # A transcript archived after the hold was placed is held from the start.
    transcribe(app, plivo, "held-later")
    Worker(services(app)).run(once=True)
    assert hold(transcript(app, "held-later")) == "ON"
    lifted = client.put("/api/recordings/held/legal-hold", json={"on": False}, headers=admin)
    assert lifted.status_code == 200
    assert hold(kept) == "OFF"


# --- asking for transcripts ---------------------------------------------------------------------


def test_recordings_started_with_transcription_auto_ask_plivo_for_one(
    make_app, plivo, monkeypatch
) -> None:
    for setting, asked in (("auto", True), ("off", False)):
        app = make_app(TRANSCRIPTION=setting)
        plivo.add_conference(f"Desk-{setting}")  # one recording at a time per conference
        operator = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}
        started = app.test_client().post(
            f"/api/conferences/Desk-{setting}/recording", headers=operator
        )
        assert started.status_code == 201, started.json
        (body,) = [payload for method, path, payload in plivo.calls if path.endswith("/Record/")]
        plivo.calls.clear()
        if asked:
            assert body["transcription_type"] == "auto"
            assert body["transcription_url"] == (
                "https://archive.example.test/plivo/transcription#rc=5&rp=all"
            )
            assert body["transcription_method"] == "POST"
        else:
            assert "transcription_type" not in body
            assert "transcription_url" not in body


def test_transcription_setting_is_off_by_default_and_checked() -> None:
    assert load("/x", {}).transcription == "off"
    assert load("/x", {"TRANSCRIPTION": "AUTO"}).transcription == "auto"
    with pytest.raises(ConfigError, match="TRANSCRIPTION"):
        load("/x", {"TRANSCRIPTION": "yes"})


def test_transcripts_fetch_reads_what_plivo_has_for_recordings_lacking_one(
    app, plivo, runner
) -> None:
    for recording_id in ("has-one", "plivo-has", "plivo-lacks"):
        queue(app, plivo, recording_id)
    transcribe(app, plivo, "has-one", "first words")
    plivo.transcribe("plivo-has", "Speaker 0: fetched later")  # never called back
    plivo.calls.clear()
    result = runner.invoke(cli, ["transcripts", "fetch"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        "transcripts: 2 recording(s) looked at, 1 fetched, 1 none at Plivo, 0 failed"
    )
    asked = sorted(path.split("/")[-2] for method, path, _ in plivo.calls)
    assert asked == ["plivo-has", "plivo-lacks"]  # not the one that has a transcript
    fetched = transcript(app, "plivo-has")
    assert fetched.status == "received"
    assert fetched.details["source"] == "api"
    with services(app).sessions() as session:
        assert session.get(Transcript, fetched.id).text == "Speaker 0: fetched later"
    again = runner.invoke(cli, ["transcripts", "fetch", "--since", "2000-01-01"])
    assert "1 recording(s) looked at, 0 fetched, 1 none at Plivo" in again.output
    future = runner.invoke(cli, ["transcripts", "fetch", "--since", "2999-01-01"])
    assert "0 recording(s) looked at" in future.output
    bad = runner.invoke(cli, ["transcripts", "fetch", "--since", "yesterday"])
    assert bad.exit_code == 2


def test_transcripts_order_says_how_many_and_orders_only_with_yes(app, plivo, runner) -> None:
    for recording_id in ("old-1", "old-2", "has-one"):
        queue(app, plivo, recording_id)
    Worker(services(app)).run(once=True)
    transcribe(app, plivo, "has-one")
    dry = runner.invoke(cli, ["transcripts", "order"])
    assert dry.exit_code == 0, dry.output
    assert "2 archived recording(s) have no transcript" in dry.output
    assert "--yes" in dry.output
    assert plivo.transcription_orders == []

    ordered = runner.invoke(cli, ["transcripts", "order", "--yes"])
    assert ordered.exit_code == 0, ordered.output
    assert ordered.output.strip().splitlines()[-1] == (
        "transcripts: 2 recording(s) looked at, 2 ordered, 0 skipped, 0 failed"
    )
    assert sorted(rid for rid, _ in plivo.transcription_orders) == ["old-1", "old-2"]
    assert {body["transcription_callback_url"] for _, body in plivo.transcription_orders} == {
        "https://archive.example.test/plivo/transcription#rc=5&rp=all"
    }
    # Ordered once: a second run orders nothing, and the ordered transcript is taken when it
    # comes back.
    again = runner.invoke(cli, ["transcripts", "order", "--yes"])
    assert "0 recording(s) looked at" in again.output
    assert len(plivo.transcription_orders) == 2
    assert transcript(app, "old-1").status == "ordered"
    transcribe(app, plivo, "old-1", "Speaker 0: ordered words")
    assert transcript(app, "old-1").status == "received"
    assert transcript(app, "old-1").sha256 is not None
    Worker(services(app)).run(once=True)
    assert transcript(app, "old-1").archived_at is not None
    assert transcript(app, "old-2").archived_at is None  # nothing to archive until it comes


def test_transcripts_order_refuses_without_public_url(make_app, plivo) -> None:
    app = make_app(PUBLIC_URL="")
    queue_app = app
    params = plivo.finish_recording("x", MP3_TAG)
    del params  # without PUBLIC_URL no callback is accepted; seed the row directly
    with transaction(services(queue_app).sessions) as session:
        session.add(
            Recording(
                recording_id="x",
                start_ms=1_700_000_000_000,
                status=Status.ARCHIVED,
                attempts=1,
                legal_hold=False,
                created_at=dt.datetime.now(dt.UTC),
                updated_at=dt.datetime.now(dt.UTC),
            )
        )
    result = app.test_cli_runner().invoke(cli, ["transcripts", "order", "--yes"])
    assert result.exit_code == 1
    assert "PUBLIC_URL" in result.output
    assert plivo.transcription_orders == []


def test_transcripts_fetch_counts_plivo_failures_and_stops_on_refused_credentials(
    app, plivo, runner
) -> None:
    for recording_id in ("a", "b"):
        queue(app, plivo, recording_id)
    plivo.transcribe("b", "words")
    plivo.api_faults[:] = [500, 500, 500]  # the first GET fails through its retries
    result = runner.invoke(cli, ["transcripts", "fetch"])
    assert result.exit_code == 0, result.output
    assert "2 recording(s) looked at, 1 fetched, 0 none at Plivo, 1 failed" in result.output
    plivo.api_faults[:] = [401]
    refused = runner.invoke(cli, ["transcripts", "fetch"])
    assert refused.exit_code == 1
    assert "PLIVO_AUTH_ID/TOKEN" in refused.output


def test_two_workers_never_write_the_same_transcript_at_once(app, plivo, monkeypatch) -> None:
    from webhook.archive import transcripts as archiving

    queue(app, plivo, "shared")
    transcribe(app, plivo, "shared")
    puts: list[str] = []
    storage = services(app).storage
    real_put = storage.put

    def put(key: str, *args: Any, **kwargs: Any) -> Any:
        puts.append(key)
        # While this worker writes, another one looks for due transcripts: it must skip this one.
        if key.endswith(".transcript.json"):
            assert archiving.archive_transcripts(services(app)) == 0
        return real_put(key, *args, **kwargs)

    monkeypatch.setattr(storage, "put", put)
    Worker(services(app)).run(once=True)
    assert [key for key in puts if key.endswith(".transcript.json")] == [
        transcript(app, "shared").archive_key
    ]
    assert transcript(app, "shared").archive_attempts == 1
