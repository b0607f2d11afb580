"""`webhook demo`: the service on its embedded defaults, with one recording flowing through it.

No Plivo account is needed: a local media server plays Plivo's media host, and the callback is
signed exactly as Plivo signs it, with a demo auth token.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import secrets
import signal
import struct
import threading
import time
import uuid
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click
import requests
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from webhook import Services, create_app, logs, services
from webhook.archive.worker import Worker
from webhook.auth import add_staff, revoke_staff
from webhook.config import Settings, load
from webhook.db import transaction, upgrade
from webhook.models import Role
from webhook.signature import NONCE_HEADER, sign, signature_base


def tone_wav(seconds: float = 2.0, rate: int = 8000, hz: float = 440.0) -> bytes:
    """A short sine tone as 16-bit mono WAV: the demo's recording."""
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / rate)))
        for i in range(int(seconds * rate))
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return buffer.getvalue()


def _media_server(audio: bytes) -> ThreadingHTTPServer:
    class Media(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(audio)))
            self.end_headers()
            self.wfile.write(audio)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Media)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# The demo always runs on the embedded defaults, so it can never write a demo recording (and an
# undeletable callback log entry) into a production database or bucket.
PRODUCTION_VARIABLES = ("DATABASE_URL", "ARCHIVE_URL", "DYNO", "RETENTION_DAYS", "OBJECT_LOCK_MODE")


def demo_settings(instance_path: str, port: int) -> Settings:
    """Embedded defaults, completed so the demo runs with no Plivo account."""
    env = {k: v for k, v in os.environ.items() if k not in PRODUCTION_VARIABLES}
    settings = load(instance_path, env)
    return settings.replace(
        plivo_auth_token=settings.plivo_auth_token or "demo-" + secrets.token_urlsafe(16),
        public_url=f"http://127.0.0.1:{port}",
        recording_hosts=("127.0.0.1",),
        recording_hosts_listed=True,
        archive_retry_base_seconds=1,
    )


def run_demo(port: int, serve: bool, instance_path: str | None = None) -> bool:
    """Serve, push one signed recording and its transcript through, show the result (found by a
    phrase of its transcript); True if the audio is byte-exact and the search finds it."""
    # Keep the demo's output readable: only errors from the service's own JSON logs (the refused
    # forgery is shown by the demo itself).
    logs.configure(logging.ERROR)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    probe = Flask("webhook", instance_relative_config=True)
    settings = demo_settings(instance_path or probe.instance_path, port)
    app = create_app({"SETTINGS": settings})
    svc = services(app)
    upgrade(settings.database_url)
    try:
        server = make_server("127.0.0.1", port, app, threaded=True)
    except OSError as exc:
        raise click.ClickException(
            f"port {port} is not free ({exc}); pick one with --port"
        ) from None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"

    audio = tone_wav()
    media = _media_server(audio)
    entered = _callers_enter(f"{base}/plivo/recording", settings)
    recording_id = str(uuid.uuid4())
    now_ms = int(time.time() * 1000)
    params = {
        "api_id": str(uuid.uuid4()),
        "record_url": f"http://127.0.0.1:{media.server_port}/demo/{recording_id}.wav",
        "recording_id": recording_id,
        "conference_name": "Demo Conference",
        "recording_duration": "2",
        "recording_duration_ms": "2000.00000",
        "recording_start_ms": str(now_ms - 2000),
        "recording_end_ms": str(now_ms),
    }
    callback_url = f"{base}/plivo/recording"
    nonce = secrets.token_hex(10)
    assert settings.plivo_auth_token is not None
    signature = sign(
        settings.plivo_auth_token,
        signature_base("POST", callback_url, {k: [v] for k, v in params.items()}),
        nonce,
    )
    click.echo(f"service:   {base}")
    click.echo(f"console:   {base}/console/")
    click.echo(f"database:  {settings.database_url}")
    click.echo(f"archive:   {settings.archive_url}")
    for caller, answer in entered:
        click.echo(
            f"member:    {caller} enters, signed -> {answer.status_code} {answer.text.strip()}"
        )
    answer = requests.post(
        callback_url,
        data=params,
        headers={"X-Plivo-Signature-V3": signature, NONCE_HEADER: nonce},
        timeout=10,
    )
    click.echo(f"callback:  signed as Plivo signs -> {answer.status_code} {answer.text.strip()}")
    forged = requests.post(
        callback_url,
        data=params,
        headers={"X-Plivo-Signature-V3": "forged", NONCE_HEADER: "1"},
        timeout=10,
    )
    click.echo(f"forged:    the same callback with a bad signature -> {forged.status_code}")
    transcribed = _send_transcript(settings.plivo_auth_token, base, recording_id)
    click.echo(f"transcript: Plivo's transcription callback, signed -> {transcribed.status_code}")

    jobs = Worker(svc).run(once=True)
    click.echo(f"worker:    archived {jobs} recording(s)")

    staff_name = f"demo-{secrets.token_hex(3)}"
    with transaction(svc.sessions) as session:
        token = add_staff(session, staff_name, Role.ADMIN)
    headers = {"Authorization": f"Bearer {token}"}
    shown = requests.get(f"{base}/api/recordings/{recording_id}", headers=headers, timeout=10)
    click.echo(f"api:       GET /api/recordings/{recording_id} ->")
    click.echo(json.dumps(shown.json(), indent=2))
    found = requests.get(
        f"{base}/api/recordings",
        params={"q": DEMO_SEARCH},
        headers=headers,
        timeout=10,
    ).json()["recordings"]
    hit = next((r for r in found if r["recording_id"] == recording_id), None)
    click.echo(f"search:    GET /api/recordings?q={DEMO_SEARCH} -> {len(found)} found")
    if hit is not None:
        click.echo(f"           snippet: {hit['snippet']}")
    transcript = requests.get(
        f"{base}/api/recordings/{recording_id}/transcript", headers=headers, timeout=10
    ).json()
    archived_transcript = (transcript.get("archive") or {}).get("key")
    click.echo(
        f"           transcript SHA-256 {transcript['sha256']}, archived as {archived_transcript}"
    )
    played = requests.get(
        f"{base}/api/recordings/{recording_id}/audio", headers=headers, timeout=10
    )
    digest = hashlib.sha256(played.content).hexdigest()
    exact = digest == hashlib.sha256(audio).hexdigest()
    click.echo(
        f"audio:     {len(played.content)} bytes, SHA-256 {digest}"
        f" -> {'byte-exact' if exact else 'DIFFERENT'}"
    )
    media.shutdown()
    exact = exact and hit is not None
    if not serve:
        _close(svc, server, staff_name)
        return exact
    stop = threading.Event()
    # SIGTERM (a terminal closed, `kill`, a process manager) ends the demo as Ctrl-C does, so the
    # token is revoked either way.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    click.echo(
        f"\nThe service keeps running at {base} with its worker. An admin token for you"
        " (revoked when the demo stops):\n"
        f"  curl -H 'Authorization: Bearer {token}' {base}/api/recordings\n"
        f"or sign in to the staff console at {base}/console/ with it.\n"
        "Press Ctrl-C to stop."
    )
    try:
        Worker(svc, stop).run()
    except KeyboardInterrupt:
        pass
    finally:
        _close(svc, server, staff_name)
    return exact


DEMO_TRANSCRIPT = (
    "Speaker 0: Good morning, this call is recorded for compliance.\n"
    "Speaker 1: Understood. I would like to confirm the order for the treasury bonds."
)
DEMO_SEARCH = '"treasury bonds"'


def _send_transcript(auth_token: str, base: str, recording_id: str) -> requests.Response:
    """Plivo's transcription callback for the demo recording, signed as Plivo signs it."""
    params = {
        "transcription": DEMO_TRANSCRIPT,
        "recording_id": recording_id,
        "call_uuid": str(uuid.uuid4()),
        "duration": "2",
        "transcription_charge": "0.00",
        "transcription_rate": "0.05",
    }
    url = f"{base}/plivo/transcription"
    nonce = secrets.token_hex(10)
    signature = sign(
        auth_token, signature_base("POST", url, {k: [v] for k, v in params.items()}), nonce
    )
    return requests.post(
        url,
        data=params,
        headers={"X-Plivo-Signature-V3": signature, NONCE_HEADER: nonce},
        timeout=10,
    )


def _callers_enter(callback_url: str, settings: Settings) -> list[tuple[str, requests.Response]]:
    """Two callers enter the demo conference: the member events, signed as Plivo signs them,
    that a Conference XML callbackUrl receives."""
    assert settings.plivo_auth_token is not None
    conference_uuid = str(uuid.uuid4())
    answers = []
    for member_id, caller in (("1", "+14155550101"), ("2", "+442071838750")):
        fields = {
            "ConferenceAction": "enter",
            "ConferenceName": "Demo Conference",
            "ConferenceUUID": conference_uuid,
            "ConferenceMemberID": member_id,
            "CallUUID": str(uuid.uuid4()),
            "From": caller,
            "To": "+14155550100",
        }
        nonce = secrets.token_hex(10)
        signed = signature_base("POST", callback_url, {k: [v] for k, v in fields.items()})
        headers = {
            "X-Plivo-Signature-V3": sign(settings.plivo_auth_token, signed, nonce),
            NONCE_HEADER: nonce,
        }
        answers.append(
            (caller, requests.post(callback_url, data=fields, headers=headers, timeout=10))
        )
    return answers


def _close(svc: Services, server: BaseWSGIServer, staff_name: str) -> None:
    """Stop serving and revoke the demo's admin token."""
    server.shutdown()
    with transaction(svc.sessions) as session:
        revoke_staff(session, staff_name)
    svc.engine.dispose()
