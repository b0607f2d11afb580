"""`/metrics`: Prometheus text behind METRICS_TOKEN, every number read from the database."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from tests.conftest import (
    CALLBACK_URL,
    ON_POSTGRES,
    PUBLIC_URL,
    AppFactory,
    free_port,
    mp3_bytes,
    post_callback,
)
from tests.fakeplivo import FakePlivo
from tests.processes import Deployment, Process, process_env, read_procfile, run_all
from webhook import services
from webhook.archive.worker import Worker
from webhook.db import make_engine, transaction
from webhook.models import (
    CallbackLog,
    CallbackRefusal,
    PlivoDeletion,
    Recording,
    RecordingNotice,
    Status,
)

METRICS_TOKEN = "metrics-" + "x" * 24
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text answer: (name, sorted labels) → value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return samples(response.get_data(as_text=True))


def status(value: str) -> tuple[tuple[str, str], ...]:
    return (("status", value),)


def outcome(value: str, reason: str = "", kind: str = "recording") -> tuple[tuple[str, str], ...]:
    return (("kind", "" if value == "refused" else kind), ("outcome", value), ("reason", reason))


@pytest.fixture
def metrics_app(make_app: AppFactory) -> Flask:
    return make_app(METRICS_TOKEN=METRICS_TOKEN)


def test_metrics_are_off_without_a_token_and_closed_without_the_right_one(
    make_app: AppFactory, metrics_app: Flask
) -> None:
    off = make_app().test_client().get("/metrics")
    assert off.status_code == 404 and off.json["error"] == "not_found"
    client = metrics_app.test_client()
    assert client.get("/metrics").status_code == 401
    wrong = {"Authorization": "Bearer " + "y" * 32}
    assert client.get("/metrics", headers=wrong).json["error"] == "unauthorized"


def test_numbers_follow_callbacks_archiving_failures_and_refusals(
    metrics_app: Flask, plivo: FakePlivo
) -> None:
    client = metrics_app.test_client()
    empty = scrape(client)
    assert empty[("webhook_recordings", status("pending"))] == 0
    assert empty[("webhook_archive_lag_seconds", ())] == 0

    sizes = {"m-1": 1000, "m-2": 2500, "m-3": 700}
    sent = {}
    for recording_id, size in sizes.items():
        sent[recording_id] = plivo.finish_recording(recording_id, mp3_bytes(size))
        assert post_callback(client, plivo, sent[recording_id]).status_code == 200
    # Plivo's retry of the same callback (a fresh nonce): a duplicate.
    assert post_callback(client, plivo, sent["m-1"]).status_code == 200
    forged = plivo.finish_recording("m-forged", b"x")
    headers = plivo.sign_request("POST", CALLBACK_URL, forged, auth_token="not-the-token")
    for _ in range(2):
        assert client.post("/plivo/recording", data=forged, headers=headers).status_code == 403
    assert client.post("/plivo/recording", data=forged).status_code == 403  # unsigned
    # A Conference XML member event on the same callback URL: logged as its own kind.
    member = {"ConferenceAction": "digits", "ConferenceName": "Room 1", "CallUUID": "call-1"}
    assert post_callback(client, plivo, member).json["status"] == "ignored"
    waiting = scrape(client)
    assert waiting[("webhook_recordings", status("pending"))] == 3
    assert waiting[("webhook_archive_lag_seconds", ())] > 0

    plivo.media.pop("m-3")  # the media host lost it: every attempt fails
    while Worker(services(metrics_app)).run(once=True):
        pass
    found = scrape(client)

    assert found[("webhook_recordings", status("archived"))] == 2
    assert found[("webhook_recordings", status("failed"))] == 1
    assert found[("webhook_recordings", status("pending"))] == 0
    assert found[("webhook_archive_lag_seconds", ())] == 0
    assert found[("webhook_recording_attempts", status("archived"))] == 2
    assert found[("webhook_recording_attempts", status("failed"))] == 3  # ARCHIVE_MAX_ATTEMPTS
    assert found[("webhook_archived_bytes_total", ())] == 1000 + 2500
    assert found[("webhook_archive_duration_seconds_count", ())] == 2
    assert found[("webhook_archive_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert found[("webhook_callbacks_total", outcome("accepted"))] == 3
    assert found[("webhook_callbacks_total", outcome("duplicate"))] == 1
    assert found[("webhook_callbacks_total", outcome("accepted", kind="member"))] == 1
    assert found[("webhook_callbacks_total", outcome("duplicate", kind="member"))] == 0
    assert found[("webhook_callbacks_total", outcome("refused", "bad_signature"))] == 2
    assert found[("webhook_callbacks_total", outcome("refused", "missing_signature"))] == 1
    with services(metrics_app).sessions() as session:
        assert session.scalar(select(func.count()).select_from(CallbackRefusal)) == 2  # reasons


def test_notices_deletions_and_mismatches_are_counted_as_the_database_has_them(
    metrics_app: Flask, plivo: FakePlivo
) -> None:
    client = metrics_app.test_client()
    before = scrape(client)
    assert before[("webhook_archive_mismatches", ())] == 0
    assert before[("webhook_recording_notices_total", (("outcome", "failed"),))] == 0
    assert before[("webhook_plivo_deletions_total", (("outcome", "mismatch"),))] == 0
    params = plivo.finish_recording("m-policy", mp3_bytes(1000))
    assert post_callback(client, plivo, params).status_code == 200
    with transaction(services(metrics_app).sessions) as session:
        recording = session.scalars(select(Recording)).one()
        recording.archive_mismatch = "the archived bytes' SHA-256 differs"
        session.add_all(
            [
                RecordingNotice(recording_pk=recording.id, member_id="1", outcome="played"),
                RecordingNotice(recording_pk=recording.id, member_id="2", outcome="failed"),
                RecordingNotice(recording_pk=recording.id, member_id="3", outcome="failed"),
                PlivoDeletion(recording_id="m-policy", outcome="refused"),
                PlivoDeletion(recording_id="m-policy", outcome="mismatch"),
            ]
        )

    found = scrape(client)

    assert found[("webhook_archive_mismatches", ())] == 1
    assert found[("webhook_recording_notices_total", (("outcome", "played"),))] == 1
    assert found[("webhook_recording_notices_total", (("outcome", "failed"),))] == 2
    assert found[("webhook_plivo_deletions_total", (("outcome", "refused"),))] == 1
    assert found[("webhook_plivo_deletions_total", (("outcome", "mismatch"),))] == 1
    assert found[("webhook_plivo_deletions_total", (("outcome", "deleted"),))] == 0


def test_refusals_are_one_row_per_reason_and_minute(metrics_app: Flask) -> None:
    client = metrics_app.test_client()
    for _ in range(50):
        assert client.post("/plivo/recording", data={"recording_id": "x"}).status_code == 403
    with services(metrics_app).sessions() as session:
        rows = session.execute(select(CallbackRefusal.reason, CallbackRefusal.count)).all()
    assert len(rows) <= 2  # the minute may turn during the loop
    assert {reason for reason, _ in rows} == {"missing_signature"}
    assert sum(n for _, n in rows) == 50
    assert (
        scrape(client)[("webhook_callbacks_total", outcome("refused", "missing_signature"))] == 50
    )


# --- under load: 2 gunicorn workers, 2 archive worker processes -----------------------------------


@pytest.fixture
def deployment(
    database_url: str, bucket: str, s3_endpoint: str, plivo: FakePlivo, tmp_path: Path
) -> Iterator[tuple[Deployment, dict[str, str]]]:
    if not ON_POSTGRES:
        pytest.skip("several worker processes claim through PostgreSQL (set TEST_DATABASE_URL)")
    env = process_env(
        BIN,
        tmp_path / "home",
        {
            "DATABASE_URL": database_url,
            "ARCHIVE_URL": f"s3://{bucket}/load",
            "AWS_ENDPOINT_URL": s3_endpoint,
            **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
            "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"],
            "PLIVO_AUTH_ID": plivo.auth_id,
            "PLIVO_AUTH_TOKEN": plivo.auth_token,
            "PLIVO_API_URL": plivo.url,
            "PUBLIC_URL": PUBLIC_URL,
            "RECORDING_HOSTS": "127.0.0.1",
            "ARCHIVE_RETRY_BASE_SECONDS": "0",
            "ARCHIVE_MAX_ATTEMPTS": "2",
            "METRICS_TOKEN": METRICS_TOKEN,
            "PORT": str(free_port()),
            "WEB_CONCURRENCY": "2",
        },
    )
    procfile = read_procfile(ROOT / "Procfile")
    run_all([["bash", "-c", procfile["release"]]], env, ROOT)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = [
        Process("web", procfile["web"], env, ROOT, logs),
        Process("worker-1", procfile["worker"], env, ROOT, logs),
        Process("worker-2", procfile["worker"], env, ROOT, logs),
    ]
    running = Deployment(f"http://127.0.0.1:{env['PORT']}", processes)
    try:
        running.wait_until_healthy()
        yield running, env
    finally:
        running.stop()


@pytest.mark.e2e
def test_metrics_match_the_database_with_two_web_and_two_archive_workers(
    deployment: tuple[Deployment, dict[str, str]], plivo: FakePlivo, database_url: str
) -> None:
    running, _env = deployment
    url = running.base_url + "/plivo/recording"
    accepted, lost, duplicates, forged, unsigned = 24, 3, 6, 5, 4
    calls: list[tuple[dict[str, str], str | None]] = []
    for n in range(accepted):
        params = plivo.finish_recording(f"load-{n}", mp3_bytes(2000 + n))
        calls.append((params, None))
        if n < duplicates:
            calls.append((params, None))
    for n in range(lost):  # their media is gone: they end failed
        params = plivo.finish_recording(f"lost-{n}", b"gone")
        plivo.media.pop(f"lost-{n}")
        calls.append((params, None))
    for n in range(forged):
        calls.append((plivo.finish_recording(f"forged-{n}", b"x"), "wrong-token"))

    def send(call: tuple[dict[str, str], str | None]) -> None:
        params, token = call
        response = plivo.send_callback(url, params, sign_url=CALLBACK_URL, auth_token=token)
        assert response.status_code == (403 if token else 200), response.text

    threads = [threading.Thread(target=send, args=(call,)) for call in calls]
    with running.logs_on_failure():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for _ in range(unsigned):
            assert requests.post(url, data={"recording_id": "u"}, timeout=10).status_code == 403

        engine = make_engine(database_url)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with engine.connect() as connection:
                    waiting = connection.scalar(
                        select(func.count())
                        .select_from(Recording)
                        .where(Recording.status.in_([Status.PENDING, Status.ARCHIVING]))
                    )
                if waiting == 0:
                    break
                time.sleep(0.3)
            assert waiting == 0, "archiving did not finish"
            # Scrape several times: each gunicorn worker answers the same.
            scrapes = [
                requests.get(
                    running.base_url + "/metrics",
                    headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                    timeout=10,
                )
                for _ in range(6)
            ]
            with engine.connect() as connection:
                by_status = dict(
                    connection.execute(
                        select(Recording.status, func.count()).group_by(Recording.status)
                    ).all()
                )
                bytes_archived = connection.scalar(
                    select(func.sum(Recording.archive_size)).where(
                        Recording.status == Status.ARCHIVED
                    )
                )
                attempts = dict(
                    connection.execute(
                        select(Recording.status, func.sum(Recording.attempts)).group_by(
                            Recording.status
                        )
                    ).all()
                )
                logged = connection.scalar(select(func.count()).select_from(CallbackLog))
        finally:
            engine.dispose()
    found = [samples(r.text) for r in scrapes]
    assert all(f == found[0] for f in found[1:])
    metrics = found[0]
    assert by_status == {"archived": accepted, "failed": lost}
    assert metrics[("webhook_recordings", status("archived"))] == accepted
    assert metrics[("webhook_recordings", status("failed"))] == lost
    assert metrics[("webhook_recording_attempts", status("archived"))] == attempts["archived"]
    assert (
        metrics[("webhook_recording_attempts", status("failed"))] == attempts["failed"] == 2 * lost
    )
    assert metrics[("webhook_archived_bytes_total", ())] == bytes_archived
    assert bytes_archived == sum(2000 + n for n in range(accepted))
    assert metrics[("webhook_archive_duration_seconds_count", ())] == accepted
    assert metrics[("webhook_archive_lag_seconds", ())] == 0
    assert metrics[("webhook_callbacks_total", outcome("accepted"))] == accepted + lost
    assert metrics[("webhook_callbacks_total", outcome("duplicate"))] == duplicates
    assert logged == accepted + lost + duplicates
    assert metrics[("webhook_callbacks_total", outcome("refused", "bad_signature"))] == forged
    assert metrics[("webhook_callbacks_total", outcome("refused", "missing_signature"))] == unsigned
    print(
        f"load: {len(calls) + unsigned} callbacks, {accepted} archived, {lost} failed, "
        f"{duplicates} duplicates, {forged + unsigned} refused; metrics matched the database"
    )
