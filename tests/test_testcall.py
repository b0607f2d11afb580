"""`webhook send-test-callback`: a signed test callback to the running service, archived."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.serving import make_server

from tests.conftest import AppFactory, free_port
from tests.fakeplivo import FakePlivo
from webhook import services
from webhook.archive.media import RefusedURL, check_url
from webhook.archive.worker import Worker
from webhook.cli import cli
from webhook.models import CallbackLog, Recording, Status
from webhook.testcall import TEST_CONFERENCE, silence_wav


@pytest.fixture
def live(make_app: AppFactory) -> Iterator[Flask]:
    """The app behind a real HTTP server at its own PUBLIC_URL (http://127.0.0.1:port)."""
    port = free_port()
    # RECORDING_HOSTS lists no loopback host: the test audio is fetched because it is ours.
    app = make_app(PUBLIC_URL=f"http://127.0.0.1:{port}", RECORDING_HOSTS="media.plivo.com")
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield app
    server.shutdown()
    thread.join()
    server.server_close()


def send(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(cli, args=["send-test-callback", *args])


def test_the_test_callback_is_accepted_and_archived_as_a_test(live: Flask) -> None:
    result = send(live)
    assert result.exit_code == 0, result.output
    assert " -> 200 " in result.output
    with services(live).sessions() as session:
        recording = session.scalars(select(Recording)).one()
        logged = session.scalars(select(CallbackLog)).one()
    assert recording.recording_id.startswith("test-")
    assert recording.conference_name == TEST_CONFERENCE
    assert logged.signature_verdict == "v3"
    assert f"recording {recording.recording_id} accepted" in result.output

    assert Worker(services(live)).run(once=True) == 1

    with services(live).sessions() as session:
        archived = session.scalars(select(Recording)).one()
    assert archived.status == Status.ARCHIVED, archived.last_error
    path = services(live).storage.local_path(str(archived.archive_key))
    assert path is not None and path.read_bytes() == silence_wav()
    assert str(archived.archive_key).endswith(f"/{archived.recording_id}.wav")


def test_wait_reports_the_archived_object(live: Flask) -> None:
    stop = threading.Event()
    worker = Worker(services(live), stop)
    thread = threading.Thread(target=worker.run, kwargs={"poll_seconds": 0.1})
    thread.start()
    try:
        result = send(live, "--wait", "30")
    finally:
        stop.set()
        thread.join()
    assert result.exit_code == 0, result.output
    assert "archived as recordings/" in result.output
    assert "sha256 " in result.output


def test_a_token_that_differs_from_the_running_service_is_named(
    live: Flask, make_app: AppFactory
) -> None:
    public_url = services(live).settings.public_url
    other = make_app(PUBLIC_URL=str(public_url), PLIVO_AUTH_TOKEN="another-token")
    result = send(other)
    assert result.exit_code == 1
    assert " -> 403 " in result.output
    assert "refused the signature" in result.output
    with services(live).sessions() as session:
        assert session.scalars(select(Recording)).all() == []


def test_an_unreachable_public_url_is_one_line(make_app: AppFactory) -> None:
    result = send(make_app(PUBLIC_URL=f"http://127.0.0.1:{free_port()}"))
    assert result.exit_code == 1
    assert "cannot be reached" in result.output and "Traceback" not in result.output


def test_only_our_own_test_audio_path_is_exempt_from_recording_hosts(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    settings = services(
        make_app(PUBLIC_URL="http://127.0.0.1:9", RECORDING_HOSTS="media.plivo.com")
    ).settings
    target = check_url("http://127.0.0.1:9/test-audio/test-1.wav", settings)
    # Pinned to the address checked, and never given Plivo's credentials.
    assert (str(target.address), target.port, target.send_credentials) == ("127.0.0.1", 9, False)
    for url in (
        "http://127.0.0.1:9/test-audio/real-1.wav",
        "http://127.0.0.1:9/test-audio/test-1.wav?x=1",
        "http://127.0.0.1:9/test-audio/test-1.wav?",
        "http://127.0.0.1:9/test-audio/test-1.wav#x",
        "http://user@127.0.0.1:9/test-audio/test-1.wav",
        "http://127.0.0.1:9/test-audio/%74est-1.wav",
        "http://127.0.0.1:9/test-audio/test-1.wav/../../api/recordings",
        "http://127.0.0.1:9/test-audio/test-1.wav/x.wav",
        "http://127.0.0.1:9/api/recordings",
        "http://127.0.0.1:8/test-audio/test-1.wav",
        "http://localhost:9/test-audio/test-1.wav",
        "https://127.0.0.1:9/test-audio/test-1.wav",
    ):
        with pytest.raises(RefusedURL):
            check_url(url, settings)


def test_the_test_audio_is_served_only_for_test_names(live: Flask) -> None:
    client = live.test_client()
    ok = client.get("/test-audio/test-abc.wav")
    assert ok.status_code == 200 and ok.mimetype == "audio/wav" and ok.data == silence_wav()
    assert client.get("/test-audio/rec-1.wav").status_code == 404
