"""End to end: the Procfile's processes (release, gunicorn, the worker) against S3 and Plivo fakes.

Nothing here runs in-process: the service is started the way the platform starts it, reached over
HTTP, and managed with the real `webhook` command. Plivo signs the public https URL while the
socket is plain http, as behind a TLS-terminating router.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
from sqlalchemy import select

from tests.conftest import CALLBACK_URL, PUBLIC_URL, free_port, mp3_bytes
from tests.fakeplivo import FakePlivo
from tests.processes import Deployment, Process, process_env, read_procfile, run_all
from webhook.archive.storage import PART_SIZE
from webhook.db import make_engine
from webhook.models import CallbackLog, Recording

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFERENCE = "Trading Desk 7"
CALLER = "+14155550101"
AUDIO_BYTES = 20 * 1024 * 1024  # above the 16 MiB part size: the upload is multipart
ARCHIVE_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0


@pytest.fixture
def env(
    database_url: str, bucket: str, s3_endpoint: str, plivo: FakePlivo, tmp_path: Path
) -> dict[str, str]:
    """The deployment's environment, as an operator would configure it on the platform."""
    return deployment_env(database_url, bucket, s3_endpoint, plivo, tmp_path)


def deployment_env(
    database_url: str,
    bucket: str,
    s3_endpoint: str,
    plivo: FakePlivo,
    tmp_path: Path,
    **settings: str,
) -> dict[str, str]:
    """The environment of a deployment on the test database, moto and the fake Plivo, with
    `settings` added."""
    return process_env(
        BIN,
        tmp_path / "home",
        {
            "DATABASE_URL": database_url,
            "ARCHIVE_URL": f"s3://{bucket}/archive",
            "AWS_ENDPOINT_URL": s3_endpoint,
            # The credentials and region conftest's s3_endpoint fixture gives moto.
            **{
                key: os.environ[key]
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            },
            "PLIVO_AUTH_ID": plivo.auth_id,
            "PLIVO_AUTH_TOKEN": plivo.auth_token,
            "PLIVO_API_URL": plivo.url,
            "PUBLIC_URL": PUBLIC_URL,
            "RECORDING_HOSTS": "127.0.0.1",
            "ARCHIVE_RETRY_BASE_SECONDS": "1",
            # Re-read the members of conferences being recorded every second.
            "MEMBER_POLL_SECONDS": "1",
            "PORT": str(free_port()),
            "WEB_CONCURRENCY": "2",
            **settings,
        },
    )


@dataclass
class Service:
    """The running deployment and the staff tokens made for it."""

    deployment: Deployment
    operator: dict[str, str]
    compliance: dict[str, str]


@pytest.fixture
def service(env: dict[str, str], s3: Any, bucket: str, tmp_path: Path) -> Iterator[Service]:
    """`release`, then `web` and `worker` running, /healthz answering 200, and two staff tokens."""
    # Versioned, so that an object written twice shows up as two versions.
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    procfile = read_procfile(ROOT / "Procfile")
    run_all([["bash", "-c", procfile["release"]]], env, ROOT)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[Process] = []
    deployment = Deployment(f"http://127.0.0.1:{env['PORT']}", processes)
    try:
        for kind in ("web", "worker"):
            processes.append(Process(kind, procfile[kind], env, ROOT, logs))
        # While web and worker boot: tokens made by the real command, which prints each alone
        # on its last line.
        with deployment.logs_on_failure():
            outputs = run_all(
                [
                    ["webhook", "staff", "add", "ops", "--role", "operator"],
                    ["webhook", "staff", "add", "auditor", "--role", "compliance"],
                ],
                env,
                ROOT,
            )
        operator, compliance = (output.strip().splitlines()[-1] for output in outputs)
        deployment.wait_until_healthy()
        yield Service(
            deployment,
            {"Authorization": f"Bearer {operator}"},
            {"Authorization": f"Bearer {compliance}"},
        )
    finally:
        deployment.stop()


def presigned_lifetime(url: str) -> float:
    """How long a presigned S3 URL stays valid, in seconds (SigV4 or SigV2 query auth)."""
    query = parse_qs(urlsplit(url).query)
    if "X-Amz-Expires" in query:
        return float(query["X-Amz-Expires"][0])
    return float(query["Expires"][0]) - time.time()


def wait_for_archive(base_url: str, recording_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """Poll the API until the recording is archived (or failed, which fails the test)."""
    deadline = time.monotonic() + ARCHIVE_TIMEOUT
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = requests.get(
            f"{base_url}/api/recordings/{recording_id}", headers=headers, timeout=HTTP_TIMEOUT
        )
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] == "archived":
            return body
        assert body["status"] != "failed", body
        time.sleep(0.2)
    raise AssertionError(f"{recording_id} not archived after {ARCHIVE_TIMEOUT} s: {body}")


def rows_about(database_url: str, model: Any, recording_id: str) -> list[Any]:
    """The rows of `model` about one recording, read straight from the database."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(model).where(model.recording_id == recording_id)))
    finally:
        engine.dispose()


def object_versions(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    listed = s3.list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in listed.get("Versions", []) if v["Key"] == key]


def test_procfile_processes_archive_a_conference_recording_end_to_end(
    service: Service,
    env: dict[str, str],
    plivo: FakePlivo,
    s3: Any,
    bucket: str,
    database_url: str,
) -> None:
    deployment = service.deployment
    base = deployment.base_url
    operator, compliance = service.operator, service.compliance
    public_callback = CALLBACK_URL  # what Plivo signs; the socket below is plain http
    socket_callback = f"{base}/plivo/recording"
    with deployment.logs_on_failure():
        # --- an operator records a live conference ----------------------------------------------
        plivo.add_conference(
            CONFERENCE,
            members=[
                {
                    "from": CALLER,
                    "to": "+14155550100",
                    "caller_name": "Dana",
                    "direction": "inbound",
                },
                {"from": "+442071838750", "to": "+14155550100", "direction": "inbound"},
            ],
        )
        started = requests.post(
            f"{base}/api/conferences/{quote(CONFERENCE)}/recording",
            headers=operator,
            json={},
            timeout=HTTP_TIMEOUT,
        )
        assert started.status_code == 201, started.text
        recording_id = started.json()["recording_id"]
        assert CALLER in [p["from"] for p in started.json()["participants"]]
        assert started.json()["status"] == "recording"

        # --- Plivo finishes it and calls back; the worker archives it -----------------------------
        audio = mp3_bytes(AUDIO_BYTES)
        params = plivo.finish_recording(recording_id, audio, duration_ms=1_320_000)
        callback = plivo.send_callback(socket_callback, params, sign_url=public_callback)
        assert callback.status_code == 200, callback.text
        assert callback.json() == {"status": "accepted", "recording_id": recording_id}
        # The web process wrote the callback's request line, as JSON, under the id it answered.
        (web,) = [p for p in deployment.processes if p.name.startswith("web")]
        request_id = callback.headers["X-Request-ID"]
        (line,) = [
            json.loads(text)
            for text in web.output().splitlines()
            if text.startswith("{") and request_id in text
        ]
        assert {key: line[key] for key in ("level", "logger", "msg", "method", "path")} == {
            "level": "info",
            "logger": "webhook.request",
            "msg": "request",
            "method": "POST",
            "path": "/plivo/recording",
        }
        assert (line["status"], line["recording_id"], line["callback"]) == (
            200,
            recording_id,
            "recording",
        )

        archived = wait_for_archive(base, recording_id, compliance)
        assert archived["conference_name"] == CONFERENCE
        assert archived["duration_ms"] == 1_320_000
        assert archived["attempts"] == 1, archived
        assert archived["last_error"] is None
        archive = archived["archive"]
        digest = hashlib.sha256(audio).hexdigest()
        assert archive["sha256"] == digest
        assert archive["size"] == len(audio)
        assert archive["key"].startswith("archive/recordings/")
        assert archive["key"].endswith(f"/{recording_id}.mp3")

        stored = s3.get_object(Bucket=bucket, Key=archive["key"])
        stored_bytes = stored["Body"].read()
        assert stored_bytes == audio
        assert hashlib.sha256(stored_bytes).hexdigest() == digest
        parts = -(-len(audio) // PART_SIZE)
        assert parts > 1
        assert stored["ETag"].strip('"').endswith(f"-{parts}"), "expected a multipart upload"
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

        # --- compliance finds it by a participant, however the number is written ------------------
        found = requests.get(
            f"{base}/api/recordings?participant={quote('+1 (415) 555-0101', safe='')}",
            headers=compliance,
            timeout=HTTP_TIMEOUT,
        )
        assert found.status_code == 200, found.text
        assert [r["recording_id"] for r in found.json()["recordings"]] == [recording_id]

        # --- and plays it through a short-lived presigned link ------------------------------------
        audio_link = requests.get(
            f"{base}/api/recordings/{recording_id}/audio",
            headers=compliance,
            allow_redirects=False,
            timeout=HTTP_TIMEOUT,
        )
        assert audio_link.status_code == 302, audio_link.text
        presigned = audio_link.headers["Location"]
        assert presigned.startswith(env["AWS_ENDPOINT_URL"] + "/"), presigned
        assert 0 < presigned_lifetime(presigned) <= 300
        played = requests.get(presigned, timeout=HTTP_TIMEOUT)
        assert played.status_code == 200, played.text[:500]
        assert played.content == audio

        # --- a forged callback is refused and leaves nothing behind ------------------------------
        forged_id = f"forged-{recording_id}"
        forged_params = plivo.finish_recording(forged_id, b"forged", conference_name=CONFERENCE)
        forged = plivo.send_callback(
            socket_callback, forged_params, auth_token="not-the-token", sign_url=public_callback
        )
        assert forged.status_code == 403, forged.text
        assert forged.json()["error"] == "bad_signature"
        missing = requests.get(
            f"{base}/api/recordings/{forged_id}", headers=compliance, timeout=HTTP_TIMEOUT
        )
        assert missing.status_code == 404, missing.text
        assert rows_about(database_url, Recording, forged_id) == []
        assert rows_about(database_url, CallbackLog, forged_id) == []

        # --- Plivo delivers a callback twice: one row, one archived object ------------------------
        # A recording started outside this service (console, Conference XML): the first callback
        # creates its row, the retry finds it.
        retried_id = f"retried-{recording_id}"
        retried_audio = mp3_bytes(1024 * 1024)
        retried_params = plivo.finish_recording(
            retried_id, retried_audio, conference_name=CONFERENCE
        )
        answers = [
            plivo.send_callback(socket_callback, retried_params, sign_url=public_callback)
            for _ in range(2)  # a fresh nonce each time, as Plivo's own retry sends
        ]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert [a.json()["status"] for a in answers] == ["accepted", "duplicate"]

        retried = wait_for_archive(base, retried_id, compliance)
        assert retried["archive"]["sha256"] == hashlib.sha256(retried_audio).hexdigest()
        assert len(rows_about(database_url, Recording, retried_id)) == 1
        logged = rows_about(database_url, CallbackLog, retried_id)
        assert sorted(row.duplicate for row in logged) == [False, True]
        retried_key = retried["archive"]["key"]
        assert len(object_versions(s3, bucket, retried_key)) == 1
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=retried_key).get("Contents", [])
        assert [o["Key"] for o in listed] == [retried_key]

        # --- everything is still up, each object written once ------------------------------------
        assert len(object_versions(s3, bucket, archive["key"])) == 1
        assert len(object_versions(s3, bucket, retried_key)) == 1
        for process in deployment.processes:
            assert process.running, f"{process.name} exited"
        fetched = [path for path, _ in plivo.media_requests]
        assert fetched.count(f"/media/{recording_id}.mp3") == 1, fetched
        assert fetched.count(f"/media/{retried_id}.mp3") == 1, fetched
        web_log = deployment.processes[0].output()
        assert web_log.count("Booting worker") == 2, "WEB_CONCURRENCY=2 should give two workers"
        for process in deployment.processes:
            assert "Traceback" not in process.output(), f"{process.name} logged a traceback"

        # --- a platform restart (SIGTERM) stops both cleanly -------------------------------------
        exits = {process.name: process.stop() for process in deployment.processes}
        assert exits == {"web": 0, "worker": 0}
        for process in deployment.processes:
            # Every line written, gunicorn's own (its workers' exits) included. (At exit, gevent
            # may still print one ignored exception from logging's cleanup: gevent/gevent#2148.)
            assert "Logging error" not in process.output(), f"{process.name} lost a log line"


# --- who was on the call: Conference XML member events -------------------------------------------

XML_CONFERENCE = "Morning Call"
CALLERS = {"ana": "+442071838750", "ben": "+14155550142", "cleo": "+14155550177"}
# Each caller's number as compliance staff might type it.
TYPED = {"ana": "44 20 7183 8750", "ben": "+1 (415) 555-0142", "cleo": "1-415-555-0177"}
DESK = "+14155550100"
STEP = 1.2  # seconds between moments, so that times a second apart in the API are in order


def parse_iso(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def test_procfile_processes_know_who_was_on_a_conference_xml_recording(
    service: Service, plivo: FakePlivo
) -> None:
    deployment = service.deployment
    base = deployment.base_url
    compliance = service.compliance

    def deliver(params: dict[str, str]) -> str:
        answer = plivo.send_callback(
            f"{base}/plivo/recording", params, sign_url=CALLBACK_URL
        )  # a fresh nonce each time, as Plivo's retries carry
        assert answer.status_code == 200, answer.text
        return str(answer.json()["status"])

    def search(who: str) -> list[str]:
        response = requests.get(
            f"{base}/api/recordings",
            params={"participant": TYPED[who]},
            headers=compliance,
            timeout=HTTP_TIMEOUT,
        )
        assert response.status_code == 200, response.text
        return sorted(r["recording_id"] for r in response.json()["recordings"])

    with deployment.logs_on_failure():
        # --- day one: Ana is there from the start ------------------------------------------------
        ana_enters = plivo.join(XML_CONFERENCE, CALLERS["ana"], DESK, caller_name="Ana")
        assert [deliver(ana_enters), deliver(ana_enters)] == ["accepted", "duplicate"]
        time.sleep(STEP)
        first_start = time.time()
        time.sleep(STEP)
        ben_enters = plivo.join(XML_CONFERENCE, CALLERS["ben"], DESK)  # after the start
        assert deliver(ben_enters) == "accepted"
        time.sleep(STEP)
        first_end = time.time()
        first = plivo.finish_recording(
            "xml-day-1",
            mp3_bytes(4096),
            duration_ms=int((first_end - first_start) * 1000),
            scheme="camel",
            conference_name=XML_CONFERENCE,
        )
        ben_exits = plivo.leave(XML_CONFERENCE, "2")
        time.sleep(STEP)
        cleo_enters = plivo.join(XML_CONFERENCE, CALLERS["cleo"], DESK)  # after the end
        cleo_exits = plivo.leave(XML_CONFERENCE, "3")
        # Out of order: the recording's callback first, then Cleo's exit before her enter,
        # then Ben's exit, twice. Ana's exit never arrives.
        assert deliver(first) == "accepted"
        assert deliver(cleo_exits) == "accepted"
        assert deliver(cleo_enters) == "accepted"
        assert [deliver(ben_exits), deliver(ben_exits)] == ["accepted", "duplicate"]

        # --- day two: the same name, a new run of the conference; only Cleo -----------------------
        plivo.end_conference(XML_CONFERENCE)
        plivo.new_conference_run(XML_CONFERENCE)
        time.sleep(STEP)
        assert deliver(plivo.join(XML_CONFERENCE, CALLERS["cleo"], DESK)) == "accepted"
        time.sleep(STEP)
        second = plivo.finish_recording(
            "xml-day-2",
            mp3_bytes(4096),
            duration_ms=int(STEP * 1000),
            scheme="camel",
            conference_name=XML_CONFERENCE,
        )
        assert deliver(second) == "accepted"

        # --- both archived; the worker asks the Call API who each member is ----------------------
        day_one = wait_for_archive(base, "xml-day-1", compliance)
        day_two = wait_for_archive(base, "xml-day-2", compliance)
        assert day_one["conference_uuid"] == first["ConferenceUUID"]
        assert day_two["conference_uuid"] == second["ConferenceUUID"] != first["ConferenceUUID"]
        deadline = time.monotonic() + ARCHIVE_TIMEOUT
        while time.monotonic() < deadline and search("cleo") != ["xml-day-2"]:
            time.sleep(0.2)

        # Search by each caller's number, written another way, finds exactly their recordings.
        assert search("ana") == ["xml-day-1"]
        assert search("ben") == ["xml-day-1"]
        assert search("cleo") == ["xml-day-2"]

        # The recording shows each participant's join and leave times.
        shown = requests.get(
            f"{base}/api/recordings/xml-day-1", headers=compliance, timeout=HTTP_TIMEOUT
        ).json()["participants"]
        by_number = {p["from"]: p for p in shown}
        assert sorted(by_number) == sorted([CALLERS["ana"], CALLERS["ben"]])
        ana, ben = by_number[CALLERS["ana"]], by_number[CALLERS["ben"]]
        assert ana["caller_name"] == "Ana" and ana["source"] == "event"
        assert parse_iso(ana["joined_at"]) <= first_start
        assert ana["left_at"] is None
        assert first_start - 1 <= parse_iso(ben["joined_at"]) <= first_end
        assert parse_iso(ben["left_at"]) >= parse_iso(ben["joined_at"])
        assert parse_iso(ben["left_at"]) >= first_end - 1
        second_shown = requests.get(
            f"{base}/api/recordings/xml-day-2", headers=compliance, timeout=HTTP_TIMEOUT
        ).json()["participants"]
        assert [p["from"] for p in second_shown] == [CALLERS["cleo"]]
        for process in deployment.processes:
            assert "Traceback" not in process.output(), f"{process.name} logged a traceback"


def test_procfile_worker_finds_who_joins_an_api_started_recording_late(
    service: Service, plivo: FakePlivo
) -> None:
    deployment = service.deployment
    base = deployment.base_url
    with deployment.logs_on_failure():
        plivo.add_conference("Late Desk", members=[{"from": CALLERS["ana"], "to": DESK}])
        started = requests.post(
            f"{base}/api/conferences/Late%20Desk/recording",
            headers=service.operator,
            json={},
            timeout=HTTP_TIMEOUT,
        )
        assert started.status_code == 201, started.text
        recording_id = started.json()["recording_id"]
        assert [p["from"] for p in started.json()["participants"]] == [CALLERS["ana"]]
        time.sleep(STEP)
        # Ben joins while it records: no event tells the service, the worker's re-read does.
        plivo.conferences["Late Desk"]["members"].append(
            {"member_id": "2", "from": CALLERS["ben"], "to": DESK, "call_uuid": "call-ben"}
        )
        deadline = time.monotonic() + ARCHIVE_TIMEOUT
        shown: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(shown) < 2:
            shown = requests.get(
                f"{base}/api/recordings/{recording_id}",
                headers=service.compliance,
                timeout=HTTP_TIMEOUT,
            ).json()["participants"]
            time.sleep(0.2)
        ben = {p["from"]: p for p in shown}[CALLERS["ben"]]
        assert ben["source"] == "poll"
        assert parse_iso(ben["joined_at"]) >= started.json()["start_ms"] / 1000 - 1

        params = plivo.finish_recording(recording_id, mp3_bytes(4096), duration_ms=3000)
        params["recording_start_ms"] = str(started.json()["start_ms"])
        params["recording_end_ms"] = str(int(time.time() * 1000))
        answer = plivo.send_callback(f"{base}/plivo/recording", params, sign_url=CALLBACK_URL)
        assert answer.status_code == 200, answer.text
        wait_for_archive(base, recording_id, service.compliance)
        found = requests.get(
            f"{base}/api/recordings",
            params={"participant": TYPED["ben"]},
            headers=service.compliance,
            timeout=HTTP_TIMEOUT,
        ).json()["recordings"]
        assert [r["recording_id"] for r in found] == [recording_id]
