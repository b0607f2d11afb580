"""Endpoints about the service itself: health and its OpenAPI description."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from webhook import services
from webhook.archive.storage import StorageError
from webhook.db import request_session
from webhook.openapi import openapi_document

bp = Blueprint("meta", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 when the database and the archive answer, else 503 saying which does not."""
    checks: dict[str, str] = {}
    try:
        request_session().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except DBAPIError as exc:
        checks["database"] = f"unavailable: {type(exc.orig).__name__}"
    svc = services(current_app)
    try:
        svc.storage.check()
        checks["archive"] = "ok"
    except StorageError as exc:
        checks["archive"] = f"unavailable: {exc}"
    healthy = all(v == "ok" for v in checks.values())
    return jsonify(
        status="ok" if healthy else "unavailable", checks=checks
    ), 200 if healthy else 503


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of every endpoint."""
    return jsonify(openapi_document())
