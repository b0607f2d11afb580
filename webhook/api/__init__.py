"""The JSON API for staff: every request here is written to the audit log."""

from __future__ import annotations

from flask import Blueprint, Response, request

from webhook.api import audit, conferences, recordings
from webhook.audit import write_audit

bp = Blueprint("api", __name__, url_prefix="/api")
bp.register_blueprint(conferences.bp)
bp.register_blueprint(recordings.bp)
bp.register_blueprint(audit.bp)


@bp.after_app_request
def _audit_api_request(response: Response) -> Response:
    """Audit every request under /api, also one matching no route (404, 405): a blueprint's
    own after_request never sees those."""
    # The request itself, not its proxy: this runs after every request, callbacks included.
    path = request._get_current_object().path  # type: ignore[attr-defined]
    if path == "/api" or path.startswith("/api/"):
        return write_audit(response)
    return response
