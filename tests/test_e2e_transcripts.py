"""End to end with transcription on: the Procfile's processes receive Plivo's transcripts before
and after the recordings' own callbacks, archive them beside the audio and find them by words."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.conftest import CALLBACK_URL, PUBLIC_URL, mp3_bytes
from tests.fakeplivo import FakePlivo
from tests.processes import run_all
from tests.test_e2e import (  # noqa: F401 - `service` is a fixture
    BIN,
    ROOT,
    Service,
    deployment_env,
    rows_about,
    service,
    wait_for_archive,
)
from webhook.models import CallbackLog, Transcript

pytestmark = pytest.mark.e2e

TRANSCRIPTION_URL = PUBLIC_URL + "/plivo/transcription"
HTTP_TIMEOUT = 30.0
ARCHIVE_TIMEOUT = 60.0
EARLY_TEXT = (
    "Speaker 0: I can promise you a guaranteed return on this fund.\n"
    "Speaker 1: That is not something we say on a recorded line."
)
LATE_TEXT = "Speaker 0: café à Zürich, 東京 会議, the weather and a return flight.\n"


@pytest.fixture
def env(
    database_url: str, bucket: str, s3_endpoint: str, plivo: FakePlivo, tmp_path: Path
) -> dict[str, str]:
    """The deployment's environment with TRANSCRIPTION=auto."""
    return deployment_env(database_url, bucket, s3_endpoint, plivo, tmp_path, TRANSCRIPTION="auto")


def wait_for_transcript_archive(
    base_url: str, recording_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    """Poll the transcript until it is archived beside its audio."""
    deadline = time.monotonic() + ARCHIVE_TIMEOUT
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = requests.get(
            f"{base_url}/api/recordings/{recording_id}/transcript",
            headers=headers,
            timeout=HTTP_TIMEOUT,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if body["archive"] is not None:
            return body
        time.sleep(0.2)
    raise AssertionError(f"transcript of {recording_id} not archived: {body}")


def search(base: str, headers: dict[str, str], q: str) -> dict[str, str]:
    """Recording ids found by `q`, with their snippets."""
    answer = requests.get(
        f"{base}/api/recordings", params={"q": q}, headers=headers, timeout=HTTP_TIMEOUT
    )
    assert answer.status_code == 200, answer.text
    return {r["recording_id"]: r["snippet"] for r in answer.json()["recordings"]}


def marked(snippet: str) -> list[str]:
    return [word for span in re.findall("«([^»]*)»", snippet) for word in span.split()]


def test_transcripts_end_to_end_in_the_procfiles_processes(
    service: Service,  # noqa: F811 - the fixture imported above
    env: dict[str, str],
    plivo: FakePlivo,
    s3: Any,
    bucket: str,
    database_url: str,
) -> None:
    deployment = service.deployment
    base = deployment.base_url
    operator, compliance = service.operator, service.compliance
    recording_socket = f"{base}/plivo/recording"
    transcription_socket = f"{base}/plivo/transcription"

    def deliver_transcript(params: dict[str, str], **kw: Any) -> requests.Response:
        return plivo.send_callback(transcription_socket, params, sign_url=TRANSCRIPTION_URL, **kw)

    with deployment.logs_on_failure():
        # --- a recording started with transcription on -----------------------------------------
        plivo.add_conference("Sales Desk")
        started = requests.post(
            f"{base}/api/conferences/{quote('Sales Desk')}/recording",
            headers=operator,
            json={},
            timeout=HTTP_TIMEOUT,
        )
        assert started.status_code == 201, started.text
        early_id = started.json()["recording_id"]
        (record_call,) = [body for _, path, body in plivo.calls if path.endswith("/Record/")]
        assert record_call["transcription_type"] == "auto"
        assert record_call["transcription_url"] == TRANSCRIPTION_URL + "#rc=5&rp=all"
        assert record_call["transcription_method"] == "POST"

        # --- its transcript comes BEFORE its recording callback -------------------------------
        early_audio = mp3_bytes(256 * 1024)
        early_recording = plivo.finish_recording(early_id, early_audio)
        early_words = plivo.transcribe(early_id, EARLY_TEXT)
        answer = deliver_transcript(early_words)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"status": "accepted", "recording_id": early_id}
        callback = plivo.send_callback(recording_socket, early_recording, sign_url=CALLBACK_URL)
        assert callback.status_code == 200, callback.text

        # --- another's comes AFTER its recording was archived ---------------------------------
        late_id = f"late-{early_id}"
        late_audio = mp3_bytes(256 * 1024)
        late_recording = plivo.finish_recording(late_id, late_audio, conference_name="Ops")
        callback = plivo.send_callback(recording_socket, late_recording, sign_url=CALLBACK_URL)
        assert callback.status_code == 200, callback.text
        wait_for_archive(base, late_id, compliance)
        late_words = plivo.transcribe(late_id, LATE_TEXT)
        assert deliver_transcript(late_words).status_code == 200

        # --- a duplicate stores one transcript; a forged one is 403 and stores nothing --------
        duplicate = deliver_transcript(late_words)
        assert duplicate.status_code == 200, duplicate.text
        assert duplicate.json()["status"] == "duplicate"
        forged_id = f"forged-{early_id}"
        forged = deliver_transcript(
            {**plivo.transcribe(forged_id, "forged words"), "recording_id": forged_id},
            auth_token="not-the-token",
        )
        assert forged.status_code == 403, forged.text
        assert forged.json()["error"] == "bad_signature"
        assert rows_about(database_url, Transcript, forged_id) == []
        assert rows_about(database_url, CallbackLog, forged_id) == []
        assert len(rows_about(database_url, Transcript, late_id)) == 1
        logged = rows_about(database_url, CallbackLog, late_id)
        assert sorted((row.kind, row.duplicate) for row in logged) == [
            ("recording", False),
            ("transcription", False),
            ("transcription", True),
        ]

        # --- an error callback leaves the recording archived and shows the error ---------------
        error_id = f"too-long-{early_id}"
        error_recording = plivo.finish_recording(error_id, mp3_bytes(4096), conference_name="Ops")
        too_long = "Recording duration too long for transcription"
        assert deliver_transcript(plivo.transcribe(error_id, "", error=too_long)).status_code == 200
        plivo.send_callback(recording_socket, error_recording, sign_url=CALLBACK_URL)
        errored = wait_for_archive(base, error_id, compliance)
        assert errored["transcript"]["status"] == "error"
        assert errored["transcript"]["error"] == too_long
        assert wait_for_transcript_archive(base, error_id, compliance)["error"] == too_long

        # --- both transcripts archived beside the audio with the right SHA-256 -----------------
        for recording_id, text, audio in (
            (early_id, EARLY_TEXT, early_audio),
            (late_id, LATE_TEXT, late_audio),
        ):
            shown = wait_for_archive(base, recording_id, compliance)
            assert shown["archive"]["sha256"] == hashlib.sha256(audio).hexdigest()
            transcript = wait_for_transcript_archive(base, recording_id, compliance)
            assert transcript["text"].encode() == text.encode()  # byte-exact, non-ASCII too
            assert transcript["status"] == "received"
            key = transcript["archive"]["key"]
            audio_key = shown["archive"]["key"]
            assert key == audio_key.rsplit(".", 1)[0] + ".transcript.json"
            stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert hashlib.sha256(stored).hexdigest() == transcript["sha256"]
            assert shown["transcript"]["sha256"] == transcript["sha256"]
            assert json.loads(stored)["transcription"] == text

        # --- found by a phrase, by OR, excluded by -word, with a snippet -----------------------
        phrase = search(base, compliance, '"guaranteed return"')
        assert list(phrase) == [early_id]
        assert marked(phrase[early_id]) == ["guaranteed", "return"]
        assert set(search(base, compliance, "fund OR weather")) == {early_id, late_id}
        assert set(search(base, compliance, "return")) == {early_id, late_id}
        assert list(search(base, compliance, "return -weather")) == [early_id]
        assert list(search(base, compliance, "東京")) == [late_id]
        assert list(search(base, compliance, "zürich")) == [late_id]

        # --- webhook verify re-reads audio and transcripts --------------------------------------
        (verified,) = run_all([["webhook", "verify"]], env, ROOT)
        assert "mismatch" in verified
        assert verified.strip().endswith("6 object(s) checked, 0 mismatch(es)"), verified

        for process in deployment.processes:
            assert process.running, f"{process.name} exited"
            assert "Traceback" not in process.output(), f"{process.name} logged a traceback"
