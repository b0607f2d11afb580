"""Endpoints about the service itself: health and its OpenAPI description."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from webhook import services
from webhook.check import archive_state, callbacks_state, database_state
from webhook.errors import APIError
from webhook.openapi import openapi_document
from webhook.testcall import TEST_AUDIO_NAME, silence_wav

bp = Blueprint("meta", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 when the database (migrated to head) and the archive answer and callbacks are
    configured, else 503 naming which is not; no names of hosts or buckets (anyone may ask:
    `webhook check` shows the details to the operator)."""
    svc = services(current_app)
    checks = {
        "database": database_state(svc),
        "archive": archive_state(svc),
        "callbacks": callbacks_state(svc.settings),
    }
    healthy = all(v == "ok" for v in checks.values())
    return jsonify(
        status="ok" if healthy else "unavailable", checks=checks
    ), 200 if healthy else 503


@bp.get("/test-audio/<recording_id>.wav")
def test_audio_file(recording_id: str) -> Response:
    """The audio of `webhook send-test-callback`'s recordings: a second of silence."""
    if not TEST_AUDIO_NAME.match(f"{recording_id}.wav"):
        raise APIError(404, "not_found", "Only test recordings (test-...) have audio here")
    return Response(silence_wav(), mimetype="audio/wav")


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of every endpoint."""
    return jsonify(openapi_document())
