"""The append-only access log: who asked for what, when, from where, and what they got."""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from flask import Response, current_app, g, request
from sqlalchemy import Table, insert, select, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from webhook import services
from webhook.errors import BadParameter, error_response
from webhook.models import AuditEvent, AuditRecording, utcnow
from webhook.search import decode_cursor, encode_cursor, parse_limit, parse_time

log = logging.getLogger(__name__)
AUDIT_EVENTS: Table = AuditEvent.__table__  # type: ignore[assignment]
AUDIT_RECORDINGS: Table = AuditRecording.__table__  # type: ignore[assignment]


def note_recordings(*recording_ids: str) -> None:
    """Tell the audit log which recordings this request showed or touched."""
    g.setdefault("audit_recording_ids", []).extend(recording_ids)


def write_audit(response: Response, refusal: Callable[[], Response] | None = None) -> Response:
    """Append the request to the audit log; a request that cannot be audited is refused (503,
    as JSON or as `refusal` renders it)."""
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
        if refusal is not None:
            return refusal()
        return error_response(
            503, "audit_unavailable", "The access could not be written to the audit log"
        )
    return response


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROSECOND = dt.timedelta(microseconds=1)


def _encode(event: AuditEvent) -> str:
    return encode_cursor((event.at - EPOCH) // MICROSECOND, event.id)


def _decode(raw: str) -> tuple[dt.datetime, int]:
    microseconds, ident = decode_cursor(raw)
    try:
        return EPOCH + microseconds * MICROSECOND, ident
    except OverflowError:
        raise BadParameter("cursor", "cursor is not one this API handed out") from None


def audit_page(
    session: Session, args: Mapping[str, str]
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the access log, newest first, filtered by `staff`, `recording_id`, `since` and
    `until` (BadParameter naming a bad one), and the cursor of the next page."""
    limit = parse_limit(args.get("limit"))
    query = select(AuditEvent)
    if args.get("staff"):
        query = query.where(AuditEvent.staff_name == args["staff"])
    if args.get("recording_id"):
        query = query.where(
            AuditEvent.id.in_(
                select(AuditRecording.audit_id).where(
                    AuditRecording.recording_id == args["recording_id"]
                )
            )
        )
    if args.get("since"):
        query = query.where(AuditEvent.at >= parse_time("since", args["since"]))
    if args.get("until"):
        query = query.where(AuditEvent.at < parse_time("until", args["until"]))
    if args.get("cursor"):
        at, ident = _decode(args["cursor"])
        # A row-value bound, as for recordings, so the (at, id) index serves any depth.
        query = query.where(tuple_(AuditEvent.at, AuditEvent.id) < tuple_(at, ident))
    query = query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    page, more = rows[:limit], len(rows) > limit
    touched: dict[int, list[str]] = defaultdict(list)
    if page:
        for audit_id, recording_id in session.execute(
            select(AuditRecording.audit_id, AuditRecording.recording_id).where(
                AuditRecording.audit_id.in_([e.id for e in page])
            )
        ):
            touched[audit_id].append(recording_id)
    events = [
        {
            "id": e.id,
            "at": e.at.isoformat().replace("+00:00", "Z"),
            "staff": e.staff_name,
            "role": e.role,
            "method": e.method,
            "path": e.path,
            "query": e.query,
            "status": e.status,
            "recording_ids": sorted(touched.get(e.id, [])),
            "remote_addr": e.remote_addr,
            "user_agent": e.user_agent,
            "request_id": e.request_id,
        }
        for e in page
    ]
    return events, _encode(page[-1]) if more else None
