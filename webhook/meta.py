"""Endpoints about the service itself: health and its OpenAPI description."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from webhook import services
from webhook.archive.storage import StorageError
from webhook.db import describe_error, request_session
from webhook.openapi import openapi_document

bp = Blueprint("meta", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 when the database and the archive answer, else 503 saying which does not.

    Anyone may ask, so the answer is only ok/unavailable per check: why a check failed names the
    bucket, the endpoint or the database, and goes to the log (and `webhook check`)."""
    checks: dict[str, str] = {}
    try:
        request_session().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except DBAPIError as exc:
        checks["database"] = "unavailable"
        log.warning("health check: database unavailable", extra={"error": describe_error(exc)})
    svc = services(current_app)
    try:
        svc.storage.check()
        checks["archive"] = "ok"
    except StorageError as exc:
        checks["archive"] = "unavailable"
        log.warning("health check: archive unavailable", extra={"error": str(exc)})
    healthy = all(v == "ok" for v in checks.values())
    return jsonify(
        status="ok" if healthy else "unavailable", checks=checks
    ), 200 if healthy else 503


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of every endpoint."""
    return jsonify(openapi_document())
