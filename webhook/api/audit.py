"""Admins read the access log."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select, tuple_

from webhook.auth import require
from webhook.db import request_session
from webhook.errors import BadParameter
from webhook.models import AuditEvent, AuditRecording, Role
from webhook.search import decode_cursor, encode_cursor, parse_limit, parse_time

bp = Blueprint("audit", __name__)


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


@bp.get("/audit")
@require(Role.ADMIN)
def list_audit() -> Response:
    """The access log, newest first, filterable by staff, recording and time."""
    args = request.args
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
    session = request_session()
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
    return jsonify(
        events=[
            {
                "id": e.id,
                "at": e.at.isoformat().replace("+00:00", "Z"),
                "staff": e.staff_name,
                "role": e.role,
                "method": e.method,
                "path": e.path,
                "query": e.query,
                "params": e.params,
                "status": e.status,
                "recording_ids": sorted(touched.get(e.id, [])),
                "remote_addr": e.remote_addr,
                "user_agent": e.user_agent,
                "request_id": e.request_id,
            }
            for e in page
        ],
        next_cursor=_encode(page[-1]) if more else None,
    )
