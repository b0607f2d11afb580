"""Endpoints about the service itself: health and its OpenAPI description."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy.exc import DBAPIError

from webhook import services
from webhook.auth import bearer_token, staff_for_token
from webhook.check import archive_health, callbacks_health, database_health
from webhook.db import describe_error, request_session
from webhook.errors import APIError
from webhook.models import Role
from webhook.openapi import openapi_document
from webhook.testcall import TEST_AUDIO_NAME, silence_wav

bp = Blueprint("meta", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 when the database (migrated to the newest revision) and the archive answer and
    callbacks are configured, else 503 saying which check fails.

    Anyone may ask, so the answer is only ok/unavailable per check. Why a check failed names the
    bucket, the endpoint, the database or a setting: it goes to the log, and to an operator or
    admin asking with their bearer token (`webhook check` shows it on the command line)."""
    svc = services(current_app)
    database = database_health(svc)
    health = {
        "database": database,
        "archive": archive_health(svc),
        "callbacks": callbacks_health(svc.settings),
    }
    checks = {name: "ok" if h.problem is None else "unavailable" for name, h in health.items()}
    details = {name: h.problem for name, h in health.items() if h.problem is not None}
    for check, why in details.items():
        log.warning("health check failed", extra={"check": check, "error": why})
    healthy = not details
    body: dict[str, object] = {"status": "ok" if healthy else "unavailable", "checks": checks}
    # Who asks is looked up only when the database answers.
    if details and database.database_answers and _operator_asking():
        body["details"] = details
    return jsonify(body), 200 if healthy else 503


def _operator_asking() -> bool:
    token = bearer_token()
    if token is None:
        return False
    session = request_session()
    try:
        staff = staff_for_token(session, token)
    except DBAPIError as exc:
        # A database without the staff table yet (never migrated): nobody is known.
        session.rollback()
        log.warning("health check caller not looked up", extra={"error": describe_error(exc)})
        return False
    return staff is not None and staff.role in (Role.OPERATOR, Role.ADMIN)


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
