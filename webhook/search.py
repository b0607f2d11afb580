"""Finding recordings: the query-string filters, newest first, with a keyset cursor."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, exists, or_, select, tuple_
from sqlalchemy.orm import Session, joinedload

from webhook.errors import BadParameter
from webhook.fulltext import TextQuery, matching_recordings, parse_query, snippets
from webhook.models import Participant, Recording, Status
from webhook.notices import notices_of, some_participant_not_notified
from webhook.recordings import participant_key, participants_of, to_json

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
BIGINT = 2**63  # cursor values beyond a 64-bit column cannot even be bound to a query


def bigint(text: str) -> int:
    """A whole number that fits a BIGINT column; ValueError otherwise."""
    value = int(text)
    if not -BIGINT <= value < BIGINT:
        raise ValueError(f"{text[:20]} is out of range")
    return value


def encode_cursor(first: int, second: int) -> str:
    """An opaque page cursor holding two whole numbers (a sort key and an id)."""
    return base64.urlsafe_b64encode(f"{first}:{second}".encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> tuple[int, int]:
    """The two numbers of a cursor made by `encode_cursor`; 400 `invalid_cursor` otherwise."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
        first, _, second = text.partition(":")
        return bigint(first), bigint(second)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadParameter("cursor", "cursor is not one this API handed out") from None


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last row's (start_ms, id), newest first."""

    start_ms: int
    id: int

    def encode(self) -> str:
        return encode_cursor(self.start_ms, self.id)

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        return cls(*decode_cursor(raw))


@dataclass(frozen=True)
class RecordingFilter:
    """Validated filters for listing or exporting recordings."""

    conference: str | None = None
    conference_prefix: str | None = None
    participant: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    status: str | None = None
    min_duration_ms: int | None = None
    max_duration_ms: int | None = None
    legal_hold: bool | None = None
    retained_after: dt.datetime | None = None
    retained_before: dt.datetime | None = None
    notified: bool | None = None
    q: TextQuery | None = None


def parse_time(name: str, raw: str) -> dt.datetime:
    """An ISO-8601 date or date-time (UTC when no zone is given) as an aware UTC datetime."""
    try:
        value = dt.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise BadParameter(name, f"{name} must be an ISO-8601 date or date-time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise BadParameter(name, f"{name} is out of range") from None


def parse_time_ms(name: str, raw: str) -> int:
    """An ISO-8601 date or date-time (UTC when no zone is given) as epoch milliseconds."""
    return int(parse_time(name, raw).timestamp() * 1000)


def _seconds_ms(name: str, raw: str) -> int:
    try:
        seconds = float(raw)
    except ValueError:
        raise BadParameter(name, f"{name} must be a number of seconds") from None
    if not 0 <= seconds <= 10**9:
        raise BadParameter(name, f"{name} must be a number of seconds, 0 or more")
    return int(seconds * 1000)


def parse_filter(args: Mapping[str, str]) -> RecordingFilter:
    """The filters in a query string; a bad one raises BadParameter naming it."""

    def text(name: str) -> str | None:
        value = args.get(name)
        if value is None or value == "":
            return None
        if len(value) > 255:
            raise BadParameter(name, f"{name} is longer than 255 characters")
        return value

    status = text("status")
    if status is not None and status not in {s.value for s in Status}:
        raise BadParameter("status", f"status must be one of {', '.join(s.value for s in Status)}")
    legal_hold = text("legal_hold")
    if legal_hold is not None and legal_hold not in ("true", "false"):
        raise BadParameter("legal_hold", "legal_hold must be true or false")
    notified = text("notified")
    if notified is not None and notified not in ("true", "false"):
        raise BadParameter("notified", "notified must be true or false")
    participant = text("participant")
    since, until = text("since"), text("until")
    low, high = text("min_duration"), text("max_duration")
    retained_after, retained_before = text("retained_until_after"), text("retained_until_before")
    q = text("q")
    result = RecordingFilter(
        conference=text("conference"),
        conference_prefix=text("conference_prefix"),
        participant=participant_key(participant) if participant else None,
        since_ms=parse_time_ms("since", since) if since else None,
        until_ms=parse_time_ms("until", until) if until else None,
        status=status,
        min_duration_ms=_seconds_ms("min_duration", low) if low else None,
        max_duration_ms=_seconds_ms("max_duration", high) if high else None,
        legal_hold=None if legal_hold is None else legal_hold == "true",
        retained_after=parse_time("retained_until_after", retained_after)
        if retained_after
        else None,
        retained_before=parse_time("retained_until_before", retained_before)
        if retained_before
        else None,
        notified=None if notified is None else notified == "true",
        q=parse_query(q) if q else None,
    )
    if (
        result.since_ms is not None
        and result.until_ms is not None
        and result.until_ms < result.since_ms
    ):
        raise BadParameter("until", "until is before since")
    if (
        result.retained_after is not None
        and result.retained_before is not None
        and result.retained_before < result.retained_after
    ):
        raise BadParameter(
            "retained_until_before", "retained_until_before is before retained_until_after"
        )
    return result


def parse_limit(raw: str | None) -> int:
    """The page size: 1 to 200, 50 when not given."""
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    # isdigit() alone accepts "²" and other digits int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadParameter("limit", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def recordings_query(f: RecordingFilter, after: Cursor | None = None) -> Select[Recording]:
    """The recordings matching the filter, newest start first, after the cursor if given."""
    query = select(Recording)
    if f.conference is not None:
        query = query.where(Recording.conference_name == f.conference)
    if f.conference_prefix is not None:
        query = query.where(
            Recording.conference_name.startswith(f.conference_prefix, autoescape=True)
        )
    if f.participant is not None:
        query = query.where(
            exists().where(
                Participant.recording_pk == Recording.id,
                or_(Participant.from_key == f.participant, Participant.to_key == f.participant),
            )
        )
    if f.since_ms is not None:
        query = query.where(Recording.start_ms >= f.since_ms)
    if f.until_ms is not None:
        query = query.where(Recording.start_ms < f.until_ms)
    if f.status is not None:
        query = query.where(Recording.status == f.status)
    if f.min_duration_ms is not None:
        query = query.where(Recording.duration_ms >= f.min_duration_ms)
    if f.max_duration_ms is not None:
        query = query.where(Recording.duration_ms <= f.max_duration_ms)
    if f.legal_hold is not None:
        # `= true` (not `IS true`) so PostgreSQL can use the partial index on held recordings.
        query = query.where(Recording.legal_hold == f.legal_hold)
    if f.retained_after is not None:
        query = query.where(Recording.retain_until >= f.retained_after)
    if f.retained_before is not None:
        query = query.where(Recording.retain_until < f.retained_before)
    if f.notified is not None:
        # false: some participant was not told; true: every participant was.
        untold = some_participant_not_notified()
        query = query.where(untold if f.notified is False else ~untold)
    if f.q is not None:
        query = query.where(Recording.recording_id.in_(matching_recordings(f.q)))
    if after is not None:
        # A row-value comparison, so the index on (start_ms, id) bounds the scan at any depth.
        query = query.where(
            tuple_(Recording.start_ms, Recording.id) < tuple_(after.start_ms, after.id)
        )
    return query.order_by(Recording.start_ms.desc(), Recording.id.desc())


def recordings_page(
    session: Session, args: Mapping[str, str]
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of `GET /api/recordings` from its query string: the recordings as the API shows
    them and the next page's cursor (None on the last page); BadParameter naming a bad filter."""
    filters = parse_filter(args)
    limit = parse_limit(args.get("limit"))
    raw_cursor = args.get("cursor")
    after = Cursor.decode(raw_cursor) if raw_cursor else None
    rows = page_of_recordings(session, filters, after, limit + 1)
    page, more = rows[:limit], len(rows) > limit
    next_cursor = Cursor(page[-1].start_ms, page[-1].id).encode() if more else None
    return shown(session, filters, page), next_cursor


def page_of_recordings(
    session: Session, filters: RecordingFilter, after: Cursor | None, limit: int
) -> list[Recording]:
    """Matching recordings with their transcript's summary (not its text) loaded alongside."""
    # Joined, not a second query: one transcript at most per recording, by a unique key.
    query = recordings_query(filters, after).options(joinedload(Recording.transcript))
    return list(session.scalars(query.limit(limit)))


def shown(
    session: Session, filters: RecordingFilter, page: list[Recording]
) -> list[dict[str, Any]]:
    """A page of recordings as the API shows them: participants and notices loaded in one query
    each and, with `q`, each hit's short extract of its transcript, the words marked."""
    participants = participants_of(session, [r.id for r in page])
    notices = notices_of(session, [r.id for r in page])
    bodies = [to_json(r, participants[r.id], notices[r.id]) for r in page]
    if filters.q is not None:
        found = snippets(session, filters.q, [r.recording_id for r in page])
        for recording, body in zip(page, bodies, strict=True):
            body["snippet"] = found.get(recording.recording_id)
    return bodies
