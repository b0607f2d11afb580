"""Endpoints about the service itself: health and its OpenAPI description."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from webhook import services
from webhook.archive.storage import StorageError
from webhook.auth import bearer_token, staff_for_token
from webhook.db import describe_error, request_session
from webhook.models import Role
from webhook.openapi import openapi_document

bp = Blueprint("meta", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 when the database and the archive answer, else 503 saying which does not.

    Anyone may ask, so the answer is only ok/unavailable per check. Why a check failed names the
    bucket, the endpoint or the database: it goes to the log, and to an operator or admin asking
    with their bearer token."""
    checks: dict[str, str] = {}
    details: dict[str, str] = {}
    try:
        request_session().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except DBAPIError as exc:
        checks["database"] = "unavailable"
        details["database"] = describe_error(exc)
    svc = services(current_app)
    try:
        svc.storage.check()
        checks["archive"] = "ok"
    except StorageError as exc:
        checks["archive"] = "unavailable"
        details["archive"] = str(exc)
    for check, why in details.items():
        log.warning("health check failed", extra={"check": check, "error": why})
    healthy = not details
    body: dict[str, object] = {"status": "ok" if healthy else "unavailable", "checks": checks}
    # Who asks is looked up only when the database answers.
    if details and "database" not in details and _operator_asking():
        body["details"] = details
    return jsonify(body), 200 if healthy else 503


def _operator_asking() -> bool:
    token = bearer_token()
    if token is None:
        return False
    staff = staff_for_token(request_session(), token)
    return staff is not None and staff.role in (Role.OPERATOR, Role.ADMIN)


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of every endpoint."""
    return jsonify(openapi_document())
