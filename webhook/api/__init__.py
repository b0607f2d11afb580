"""The JSON API for staff: every request here is written to the audit log."""

from __future__ import annotations

from flask import Blueprint

from webhook.api import audit, conferences, recordings
from webhook.audit import write_audit

bp = Blueprint("api", __name__, url_prefix="/api")
bp.register_blueprint(conferences.bp)
bp.register_blueprint(recordings.bp)
bp.register_blueprint(audit.bp)
bp.after_request(write_audit)
