"""The append-only access log: who asked for what, when, from where, and what they got.

An identified staff member's request is one row holding exactly what was asked: the path, the raw
query and the decoded parameters the service read, in full (the request is refused beforehand if
it is too long to keep whole). A request from no identified staff member served nothing; it is
counted per client address, minute and status, with one bounded sample, so anonymous traffic
cannot fill the database.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, quote_from_bytes

from flask import Response, current_app, g, request
from sqlalchemy import Connection, Table, func, insert, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from webhook import services
from webhook.auth import bearer_token, staff_for_token
from webhook.db import describe_error, is_schema_missing, request_session
from webhook.edge import REQUEST_TARGET_LIMIT, request_target_length
from webhook.errors import BadParameter, error_response, not_migrated_response
from webhook.models import AuditAnonymous, AuditEvent, AuditRecording, utcnow
from webhook.recordings import RECORDING_ID
from webhook.search import decode_cursor, encode_cursor, parse_limit, parse_time

log = logging.getLogger(__name__)
AUDIT_EVENTS: Table = AuditEvent.__table__  # type: ignore[assignment]
AUDIT_RECORDINGS: Table = AuditRecording.__table__  # type: ignore[assignment]
AUDIT_ANONYMOUS: Table = AuditAnonymous.__table__  # type: ignore[assignment]

USER_AGENT_LIMIT = 256
ANONYMOUS_PATH_LIMIT = 256
# Every visible ASCII character stays as it is in a stored raw query; anything else is %-encoded.
VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))
UNSAFE_IN_TEXT = re.compile(r"[%\x00-\x1f\x7f-\x9f]")


def note_recordings(*recording_ids: str) -> None:
    """Tell the audit log which recordings this request showed or touched."""
    g.setdefault("audit_recording_ids", []).extend(recording_ids)


def storable(text: str) -> str:
    """Text the database can hold, unambiguously: `%` and control characters %-encoded."""
    return UNSAFE_IN_TEXT.sub(lambda m: quote(m.group(), safe=""), text)


def raw_query() -> str:
    """The query string exactly as it arrived (bytes beyond visible ASCII %-encoded)."""
    return quote_from_bytes(request.query_string, safe=VISIBLE_ASCII)


def client_address() -> str:
    """The client's address as the service sees it (after the trusted proxy hops)."""
    address = request.remote_addr or "unknown"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return storable(address)[:64]
    return address


def _anonymous_key(address: str) -> str:
    """Whom anonymous requests are counted under: the address, or its /64 for IPv6 (one client
    often holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


def _user_agent() -> str | None:
    agent = request.headers.get("User-Agent", "")
    return storable(agent)[:USER_AGENT_LIMIT] or None


def _staff_name() -> str | None:
    """Who made the request: set by authentication, or, for a path matching no route (no view
    ran to authenticate), the holder of the bearer token if it is valid."""
    name: str | None = g.get("staff_name")
    if name is not None or request.url_rule is not None:
        return name
    token = bearer_token()
    if token is None:
        return None
    staff = staff_for_token(request_session(), token)
    if staff is None:
        return None
    g.staff_name, g.staff_role = staff.name, staff.role
    return staff.name


def _append_event(connection: Connection, status: int) -> None:
    whole = request_target_length() <= REQUEST_TARGET_LIMIT
    params: dict[str, Any] | None = (
        {name: values for name, values in request.args.lists()} if whole else None
    )
    audit_id = connection.execute(
        insert(AUDIT_EVENTS)
        .values(
            at=utcnow(),
            staff_name=g.get("staff_name"),
            role=g.get("staff_role"),
            method=request.method[:8],
            # Kept whole: a longer request was refused (414) and served nothing.
            path=storable(request.path)[: REQUEST_TARGET_LIMIT * 3],
            query=raw_query()[: REQUEST_TARGET_LIMIT * 3],
            params=params,
            status=status,
            remote_addr=client_address(),
            user_agent=_user_agent(),
            request_id=g.get("request_id"),
        )
        .returning(AUDIT_EVENTS.c.id)
    ).scalar_one()
    touched = sorted({rid for rid in g.get("audit_recording_ids", []) if RECORDING_ID.match(rid)})
    if touched:
        connection.execute(
            insert(AUDIT_RECORDINGS),
            [{"audit_id": audit_id, "recording_id": rid} for rid in touched],
        )


def _count_anonymous(connection: Connection, status: int) -> None:
    now = utcnow()
    dialect = connection.dialect.name
    upsert = pg_insert if dialect == "postgresql" else sqlite_insert
    latest = func.greatest if dialect == "postgresql" else func.max
    statement = upsert(AUDIT_ANONYMOUS).values(
        window_start=now.replace(second=0, microsecond=0),
        remote_addr=_anonymous_key(client_address()),
        status=status,
        count=1,
        first_at=now,
        last_at=now,
        method=request.method[:8],
        path=storable(request.path)[:ANONYMOUS_PATH_LIMIT],
        user_agent=_user_agent(),
    )
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["window_start", "remote_addr", "status"],
            # The later of the two: concurrent requests may commit out of order, and the table
            # refuses a last_at that goes back.
            set_={
                "count": AUDIT_ANONYMOUS.c.count + 1,
                "last_at": latest(AUDIT_ANONYMOUS.c.last_at, statement.excluded.last_at),
            },
        )
    )


def write_audit(response: Response, refusal: Callable[[], Response] | None = None) -> Response:
    """Append the request to the audit log; a request that cannot be audited is refused (503,
    as JSON or as `refusal` renders it)."""
    session = g.get("db_session")
    if session is not None and response.status_code >= 400:
        # An error answer keeps nothing of the request, and on SQLite the request may hold the
        # single writer lock the audit needs (a locked row for a legal hold).
        session.rollback()
    try:
        staff_name = _staff_name()
        # Core statements on a connection of its own: committed even when the request's own
        # session rolled back, and without the ORM's unit-of-work cost on every API request.
        with services(current_app).engine.begin() as connection:
            if staff_name is None:
                _count_anonymous(connection, response.status_code)
            else:
                _append_event(connection, response.status_code)
    except DBAPIError as exc:
        log.error(
            "audit log unavailable",
            extra={"error": describe_error(exc), "request_id": g.get("request_id")},
        )
        response.close()
        if refusal is not None:
            return refusal()
        if is_schema_missing(exc):
            return not_migrated_response()
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
            "params": e.params,
            "status": e.status,
            "recording_ids": sorted(touched.get(e.id, [])),
            "remote_addr": e.remote_addr,
            "user_agent": e.user_agent,
            "request_id": e.request_id,
        }
        for e in page
    ]
    return events, _encode(page[-1]) if more else None
