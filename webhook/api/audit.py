"""Admins read the access log."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from webhook.audit import audit_page
from webhook.auth import require
from webhook.db import request_session
from webhook.models import Role

bp = Blueprint("audit", __name__)


@bp.get("/audit")
@require(Role.ADMIN)
def list_audit() -> Response:
    """The access log, newest first, filterable by staff, recording and time."""
    events, next_cursor = audit_page(request_session(), request.args)
    return jsonify(events=events, next_cursor=next_cursor)
