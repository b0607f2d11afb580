"""The append-only access log: who asked for what, when, from where, and what they got."""

from __future__ import annotations

import logging

from flask import Response, current_app, g, request
from sqlalchemy import Table, insert
from sqlalchemy.exc import DBAPIError

from webhook import services
from webhook.db import is_schema_missing
from webhook.errors import error_response, not_migrated_response
from webhook.models import AuditEvent, AuditRecording, utcnow

log = logging.getLogger(__name__)
AUDIT_EVENTS: Table = AuditEvent.__table__  # type: ignore[assignment]
AUDIT_RECORDINGS: Table = AuditRecording.__table__  # type: ignore[assignment]


def note_recordings(*recording_ids: str) -> None:
    """Tell the audit log which recordings this request showed or touched."""
    g.setdefault("audit_recording_ids", []).extend(recording_ids)


def write_audit(response: Response) -> Response:
    """Append the request to the audit log; a request that cannot be audited is refused (503)."""
    try:
        # Core statements on a connection of its own: committed even when the request's own
        # session rolled back, and without the ORM's unit-of-work cost on every API request.
        with services(current_app).engine.begin() as connection:
            audit_id = connection.execute(
                insert(AUDIT_EVENTS)
                .values(
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
                .returning(AUDIT_EVENTS.c.id)
            ).scalar_one()
            touched = sorted(set(g.get("audit_recording_ids", [])))
            if touched:
                connection.execute(
                    insert(AUDIT_RECORDINGS),
                    [{"audit_id": audit_id, "recording_id": rid} for rid in touched],
                )
    except DBAPIError as exc:
        log.error("audit log unavailable: %s", exc.orig, extra={"request_id": g.get("request_id")})
        response.close()
        if is_schema_missing(exc):
            return not_migrated_response()
        return error_response(
            503, "audit_unavailable", "The access could not be written to the audit log"
        )
    return response
