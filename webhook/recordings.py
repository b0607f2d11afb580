"""Recordings: validating what Plivo reports, storing it idempotently, queueing it, showing it."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, object_session, selectinload

from webhook.db import rowcount
from webhook.errors import BadParameter
from webhook.models import (
    ConferenceMember,
    LegalHoldEvent,
    Participant,
    Recording,
    Status,
    Transcript,
    utcnow,
)
from webhook.notices import notices_of, notified_at

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
RECORDING_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_DURATION_MS = 7 * 24 * 3600 * 1000  # a week: anything longer is not a real recording
EPOCH_MS_RANGE = (946684800000, 4102444800000)  # 2000-01-01 .. 2100-01-01
FILE_FORMATS = ("mp3", "wav")

# The Conference XML element calls back with CamelCase names; the Record API with snake_case.
CAMEL_NAMES = {
    "RecordUrl": "record_url",
    "RecordingID": "recording_id",
    "ConferenceName": "conference_name",
    "RecordingDuration": "recording_duration",
    "RecordingDurationMs": "recording_duration_ms",
    "RecordingStartMs": "recording_start_ms",
    "RecordingEndMs": "recording_end_ms",
    "ConferenceUUID": "conference_uuid",
}


@dataclass(frozen=True)
class RecordingReport:
    """What Plivo says about a finished recording, validated."""

    recording_id: str
    record_url: str
    conference_name: str | None = None
    api_id: str | None = None
    duration_ms: int | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    conference_uuid: str | None = None

    @property
    def file_format(self) -> str:
        suffix = urlsplit(self.record_url).path.rsplit(".", 1)[-1].lower()
        return suffix if suffix in FILE_FORMATS else "mp3"


def text_field(
    fields: Mapping[str, str], name: str, limit: int, required: bool = False
) -> str | None:
    """A callback's text field, stripped: at most `limit` printable characters (400 naming it)."""
    value = (fields.get(name) or "").strip()
    if not value:
        if required:
            raise BadParameter(name, f"{name} is required")
        return None
    if len(value) > limit:
        raise BadParameter(name, f"{name} is longer than {limit} characters")
    if not value.isprintable():
        raise BadParameter(name, f"{name} contains control characters")
    return value


def _number_ms(
    fields: Mapping[str, str], name: str, scale: int, bounds: tuple[int, int]
) -> int | None:
    return parse_ms(name, fields.get(name) or "", scale, bounds)


def parse_ms(name: str, text: str, scale: int, bounds: tuple[int, int]) -> int | None:
    """A Plivo number (`"345100.00000"`) times `scale` as an int within `bounds`, or None if empty.

    Anything else (not a number, infinite, huge, out of range) raises BadParameter naming `name`.
    """
    raw = text.strip()
    if not raw:
        return None
    # Plivo's usual form ("345100", "345100.00000"): whole, so read without a Decimal.
    whole, _, fraction = raw.partition(".")
    value: int | None
    if whole.isascii() and whole.isdigit() and len(whole) <= 18 and not fraction.strip("0"):
        value = int(whole) * scale
    else:
        try:
            number = Decimal(raw)
        except InvalidOperation:
            raise BadParameter(name, f"{name} must be a number, got {raw[:40]!r}") from None
        if not number.is_finite():
            raise BadParameter(name, f"{name} must be a finite number")
        # A huge exponent ("1e999999999") would overflow the decimal context or build a giant int.
        value = int(number * scale) if number.adjusted() <= 18 else None
    if value is None or not bounds[0] <= value <= bounds[1]:
        raise BadParameter(name, f"{name} is out of range: {raw[:40]}")
    return value


def parse_report(raw: Mapping[str, str]) -> RecordingReport:
    """Validate a callback's fields (either naming scheme); a bad field raises BadParameter."""
    fields = dict(raw)
    for camel, snake in CAMEL_NAMES.items():
        if camel in raw and not raw.get(snake):
            fields[snake] = raw[camel]
    recording_id = text_field(fields, "recording_id", 64, required=True)
    assert recording_id is not None
    if not RECORDING_ID.match(recording_id):
        raise BadParameter("recording_id", "recording_id may hold only letters, digits, . _ and -")
    record_url = text_field(fields, "record_url", 2048, required=True)
    assert record_url is not None
    try:
        parts = urlsplit(record_url)
        parts.port  # noqa: B018 - parsing the port is the check (out of range raises)
    except ValueError:
        raise BadParameter("record_url", "record_url is not a well-formed URL") from None
    if not parts.scheme or not parts.hostname:
        raise BadParameter("record_url", "record_url must be an absolute URL")
    duration_bounds = (0, MAX_DURATION_MS)
    duration_ms = _number_ms(fields, "recording_duration_ms", 1, duration_bounds)
    duration_s = _number_ms(fields, "recording_duration", 1000, duration_bounds)
    start_ms = _number_ms(fields, "recording_start_ms", 1, EPOCH_MS_RANGE)
    end_ms = _number_ms(fields, "recording_end_ms", 1, EPOCH_MS_RANGE)
    if start_ms is not None and end_ms is not None and end_ms < start_ms:
        raise BadParameter("recording_end_ms", "recording_end_ms is before recording_start_ms")
    return RecordingReport(
        recording_id=recording_id,
        record_url=record_url,
        conference_name=text_field(fields, "conference_name", 255),
        api_id=text_field(fields, "api_id", 64),
        duration_ms=duration_ms if duration_ms is not None else duration_s,
        start_ms=start_ms,
        end_ms=end_ms,
        conference_uuid=text_field(fields, "conference_uuid", 64),
    )


def archive_key(prefix: str, recording_id: str, start_ms: int, file_format: str) -> str:
    """Where a recording lives in the archive: fixed by its id and start date."""
    day = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC)
    return f"{prefix}recordings/{day:%Y/%m/%d}/{recording_id}.{file_format}"


def insert_ignoring_conflict(session: Session, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when the row was inserted (atomic under races)."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    # RETURNING rather than rowcount: psycopg reports no rowcount for ON CONFLICT DO NOTHING.
    # On the table, not the entity: the Core path costs half the CPU of the ORM's bulk insert.
    table = model.__table__
    key = table.primary_key.columns[0]
    statement = insert(table).values(**values).on_conflict_do_nothing().returning(key)
    return session.execute(statement).first() is not None


def estimated_start_ms(report: RecordingReport, now: dt.datetime) -> int:
    """The recording's start as reported; without one, the end (or now) minus the duration."""
    if report.start_ms is not None:
        return report.start_ms
    end = report.end_ms if report.end_ms is not None else int(now.timestamp() * 1000)
    return end - (report.duration_ms or 0)


# What a recording's callback says of it, written again when the callback finishes a recording
# that was started through the API.
REPORTED = (
    "record_url",
    "file_format",
    "duration_ms",
    "duration_s",
    "end_ms",
    "status",
    "next_attempt_at",
    "updated_at",
)


def new_recording_row(report: RecordingReport, now: dt.datetime) -> dict[str, Any]:
    """The row of a recording first known from its callback: queued for the archive at once."""
    return {
        "recording_id": report.recording_id,
        "conference_name": report.conference_name,
        "conference_uuid": report.conference_uuid,
        "api_id": report.api_id,
        "record_url": report.record_url,
        "file_format": report.file_format,
        "duration_ms": report.duration_ms,
        "duration_s": None if report.duration_ms is None else report.duration_ms // 1000,
        "start_ms": estimated_start_ms(report, now),
        "end_ms": report.end_ms,
        "status": Status.PENDING.value,
        "next_attempt_at": now,
        "attempts": 0,
        "legal_hold": False,
        "created_at": now,
        "updated_at": now,
    }


def record_report(
    session: Session, report: RecordingReport, now: dt.datetime | None = None
) -> bool:
    """Store a finished recording and queue its archiving; False when it was already reported.

    The row is the queue entry, so the metadata and the job are committed together. A row that
    exists in state `recording` (started through our API) moves to `pending`; any later state means
    a duplicate, which changes nothing. The archive key is left to the worker that writes the
    object, so it follows that worker's own ARCHIVE_URL.
    """
    now = now or utcnow()
    row = new_recording_row(report, now)
    inserted = insert_ignoring_conflict(session, Recording, row)
    if inserted:
        return True
    existing = session.scalars(
        select(Recording).where(Recording.recording_id == report.recording_id)
    ).one()
    changes: dict[str, Any] = {name: row[name] for name in REPORTED}
    if report.start_ms is not None:
        changes["start_ms"] = report.start_ms
    if existing.conference_name is None and report.conference_name:
        changes["conference_name"] = report.conference_name
    if existing.api_id is None and report.api_id:
        changes["api_id"] = report.api_id
    if existing.conference_uuid is None and report.conference_uuid:
        changes["conference_uuid"] = report.conference_uuid
    # Conditional on the state, so of two simultaneous callbacks exactly one moves the row.
    moved = rowcount(
        session.execute(
            update(Recording)
            .where(Recording.id == existing.id, Recording.status == Status.RECORDING)
            .values(**changes)
            .execution_options(synchronize_session=False)
        )
    )
    return moved == 1


def record_start(
    session: Session,
    recording_id: str,
    conference_name: str,
    file_format: str,
    api_id: str | None,
    record_url: str | None,
    members: list[Mapping[str, Any]],
    started_by: str,
    conference_uuid: str | None = None,
) -> Recording:
    """Store a recording just started through Plivo's API, with its conference's members."""
    # The members module builds on this one (keys, inserts): imported here, not at the top.
    from webhook.members import observe_members, refresh_participants

    now = utcnow()
    start_ms = int(now.timestamp() * 1000)
    insert_ignoring_conflict(
        session,
        Recording,
        {
            "recording_id": recording_id,
            "conference_name": conference_name,
            "api_id": api_id,
            "record_url": record_url,
            "file_format": file_format,
            "start_ms": start_ms,
            "status": Status.RECORDING,
            "attempts": 0,
            "legal_hold": False,
            "started_by": started_by,
            "created_at": now,
            "updated_at": now,
        },
    )
    # If the callback won the race, the row exists already: keep its state, add who and whom.
    recording = session.scalars(
        select(Recording).where(Recording.recording_id == recording_id)
    ).one()
    recording.started_by = started_by
    if recording.conference_uuid is None:
        recording.conference_uuid = conference_uuid
    observe_members(
        session,
        conference_name,
        members,
        "snapshot",
        now,
        conference_uuid=recording.conference_uuid,
        run=recording_id,
    )
    refresh_participants(session, recording)
    return recording


def participant_key(value: str | None) -> str | None:
    """A form of a phone number or SIP address that ignores formatting: digits, or lowercase."""
    if not value:
        return None
    value = value.strip()
    if value.lower().startswith("sip:") or "@" in value:
        return value.lower().removeprefix("sip:")
    digits = re.sub(r"\D", "", value)
    return digits or value.lower()


def find(session: Session, recording_id: str) -> Recording | None:
    """A recording by Plivo's recording id (`to_json` loads its participants)."""
    return session.scalars(
        select(Recording)
        .where(Recording.recording_id == recording_id)
        .options(selectinload(Recording.transcript))
    ).one_or_none()


def lock_recording(session: Session, recording_id: str) -> Recording | None:
    """A recording's row, locked until the transaction ends: FOR UPDATE on PostgreSQL; on SQLite,
    which ignores FOR UPDATE, a write that changes nothing first takes its single writer lock."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(Recording)
            .where(Recording.recording_id == recording_id)
            .values(updated_at=Recording.updated_at)
            .execution_options(synchronize_session=False)
        )
    return session.scalars(
        select(Recording)
        .where(Recording.recording_id == recording_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def legal_hold_history(session: Session, recording_id: str) -> list[dict[str, Any]]:
    """Every placing and lifting of a hold on this recording, oldest first."""
    events = session.scalars(
        select(LegalHoldEvent)
        .where(LegalHoldEvent.recording_id == recording_id)
        .order_by(LegalHoldEvent.id)
    )
    return [
        {"on": e.on, "reason": e.reason, "staff": e.staff_name, "at": _iso(e.at)} for e in events
    ]


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


PARTICIPANT_FIELDS = (
    ("member_id", Participant.member_id),
    ("from", Participant.from_number),
    ("to", Participant.to_number),
    ("caller_name", Participant.caller_name),
    ("direction", Participant.direction),
    ("call_uuid", Participant.call_uuid),
    ("join_time", Participant.join_time),
    ("joined_at", Participant.joined_at),
    ("left_at", Participant.left_at),
    ("source", Participant.source),
    ("notified_at", ConferenceMember.notified_at),
)
TIME_FIELDS = frozenset({"joined_at", "left_at", "notified_at"})


def participants_of(session: Session, recording_pks: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The participants of many recordings in one query, as the API shows them.

    Plain rows rather than ORM objects: a page of 200 recordings has some 600 participants, and
    building objects for them was a quarter of the request's CPU.
    """
    found: dict[int, list[dict[str, Any]]] = {pk: [] for pk in recording_pks}
    if not recording_pks:
        return found
    columns = [column for _, column in PARTICIPANT_FIELDS]
    rows = session.execute(
        select(Participant.recording_pk, *columns)
        .outerjoin(ConferenceMember, ConferenceMember.id == Participant.member_pk)
        .where(Participant.recording_pk.in_(recording_pks))
        .order_by(Participant.recording_pk, Participant.id)
    )
    names = [name for name, _ in PARTICIPANT_FIELDS]
    for pk, *values in rows:
        found[pk].append(
            {
                name: _iso(value) if name in TIME_FIELDS else value
                for name, value in zip(names, values, strict=True)
            }
        )
    return found


def to_json(
    recording: Recording,
    participants: list[dict[str, Any]] | None = None,
    notices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A recording as the API shows it (participants and notices loaded unless given)."""
    body: dict[str, Any] = {
        "recording_id": recording.recording_id,
        "conference_name": recording.conference_name,
        "conference_uuid": recording.conference_uuid,
        "status": recording.status,
        "file_format": recording.file_format,
        "duration_ms": recording.duration_ms,
        "duration_s": recording.duration_s,
        "start_ms": recording.start_ms,
        "end_ms": recording.end_ms,
        "api_id": recording.api_id,
        "record_url": recording.record_url,
        "started_by": recording.started_by,
        "archive": None,
        "attempts": recording.attempts,
        "next_attempt_at": _iso(recording.next_attempt_at)
        if recording.status == Status.PENDING
        else None,
        "last_error": recording.last_error,
        "retain_until": _iso(recording.retain_until),
        "legal_hold": recording.legal_hold,
        "legal_hold_reason": recording.legal_hold_reason,
        "created_at": _iso(recording.created_at),
        "updated_at": _iso(recording.updated_at),
    }
    if recording.status == Status.ARCHIVED:
        body["archive"] = {
            "key": recording.archive_key,
            "size": recording.archive_size,
            "sha256": recording.archive_sha256,
            "version_id": recording.archive_version_id,
            "archived_at": _iso(recording.archived_at),
        }
    if participants is None:
        session = object_session(recording)
        assert session is not None, "a recording shown without its participants is attached"
        participants = participants_of(session, [recording.id])[recording.id]
    if notices is None:
        session = object_session(recording)
        notices = notices_of(session, [recording.id])[recording.id] if session else []
    body["participants"] = [
        {**p, "notified_at": p.get("notified_at") or notified_at(p, notices)} for p in participants
    ]
    body["notices"] = notices
    body["plivo_deleted_at"] = _iso(recording.plivo_deleted_at)
    body["archive_mismatch"] = recording.archive_mismatch
    body["transcript"] = transcript_summary(recording.transcript)
    return body


def transcript_summary(transcript: Transcript | None) -> dict[str, Any] | None:
    """The recording's `transcript` object: whether there is one, its state and digest."""
    if transcript is None:
        return None
    return {
        "status": transcript.status,
        "sha256": transcript.sha256,
        "chars": transcript.chars,
        "error": transcript.error,
        "archived_at": _iso(transcript.archived_at),
    }


def requeue(session: Session, condition: ColumnElement[bool]) -> int:
    """Put recordings back on the archive queue now, with a fresh count of attempts."""
    return rowcount(
        session.execute(
            update(Recording)
            .where(condition, Recording.status.in_([Status.FAILED, Status.PENDING]))
            .values(
                status=Status.PENDING,
                attempts=0,
                next_attempt_at=utcnow(),
                lease_token=None,
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
    )
