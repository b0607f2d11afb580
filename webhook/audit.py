"""The append-only access log: who asked for what, when, from where, and what they got."""

from __future__ import annotations

import logging

from flask import Response, current_app, g, request
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError

from webhook import services
from webhook.db import transaction
from webhook.errors import error_response
from webhook.models import AuditEvent, AuditRecording, utcnow

log = logging.getLogger(__name__)


def note_recordings(*recording_ids: str) -> None:
    """Tell the audit log which recordings this request showed or touched."""
    g.setdefault("audit_recording_ids", []).extend(recording_ids)


def write_audit(response: Response) -> Response:
    """Append the request to the audit log; a request that cannot be audited is refused (503)."""
    try:
        with transaction(services(current_app).sessions) as session:
            event = AuditEvent(
                at=utcnow(),
                staff_name=g.get("staff_name"),
                role=g.get("staff_role"),
                method=request.method,
                path=request.path[:2000],
                query=request.query_string.decode("utf-8", "replace")[:4000],
                status=response.status_code,
                remote_addr=request.remote_addr,
                user_agent=request.user_agent.string or None,
                request_id=g.get("request_id"),
            )
            session.add(event)
            session.flush()
            touched = sorted(set(g.get("audit_recording_ids", [])))
            if touched:
                session.execute(
                    insert(AuditRecording),
                    [{"audit_id": event.id, "recording_id": rid} for rid in touched],
                )
    except DBAPIError as exc:
        log.error("audit log unavailable: %s", exc.orig, extra={"request_id": g.get("request_id")})
        response.close()
        return error_response(
            503, "audit_unavailable", "The access could not be written to the audit log"
        )
    return response
