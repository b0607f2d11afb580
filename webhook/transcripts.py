"""Transcripts: validating what Plivo sends, storing it once per recording, the archived
document and its digest, and how the API shows them."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, undefer

from webhook.callbacks import Outcome
from webhook.config import Settings
from webhook.db import rowcount
from webhook.errors import BadParameter
from webhook.models import Transcript, utcnow
from webhook.recordings import RECORDING_ID, insert_ignoring_conflict, text_field

RECEIVED = "received"
ERROR = "error"
ORDERED = "ordered"
# Plivo's numeric fields, kept as the strings it signed once checked to be numbers.
NUMERIC_FIELDS = ("duration", "transcription_charge", "transcription_rate")
# Ask Plivo to retry the transcription callback up to 5 times on any failure.
RETRY_FRAGMENT = "#rc=5&rp=all"
TRANSCRIPTION_PATH = "/plivo/transcription"


@dataclass(frozen=True)
class TranscriptReport:
    """A transcript (or Plivo's reason for having none) for one recording, validated."""

    recording_id: str
    text: str | None
    error: str | None
    details: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return ERROR if self.error else RECEIVED


def transcription_url(public_url: str) -> str:
    """Where Plivo delivers transcripts: PUBLIC_URL + the path, with the retry fragment."""
    return public_url + TRANSCRIPTION_PATH + RETRY_FRAGMENT


def transcription_url_for(settings: Settings) -> str | None:
    """The transcription_url to give Plivo when starting a recording: None unless
    TRANSCRIPTION=auto (Plivo charges for transcripts)."""
    if settings.transcription != "auto" or not settings.public_url:
        return None
    return transcription_url(settings.public_url)


def _number(fields: Mapping[str, str], name: str) -> str | None:
    raw = (fields.get(name) or "").strip()
    if not raw:
        return None
    try:
        number = Decimal(raw)
    except InvalidOperation:
        raise BadParameter(name, f"{name} must be a number, got {raw[:40]!r}") from None
    if not number.is_finite() or number < 0 or number.adjusted() > 12 or len(raw) > 40:
        raise BadParameter(name, f"{name} is out of range: {raw[:40]}")
    return raw


def parse_transcription(fields: Mapping[str, str]) -> TranscriptReport:
    """Validate a transcription callback's fields; a bad field raises BadParameter."""
    # Conference XML calls back with CamelCase names; whether its transcription callback does
    # too is unverified, so its RecordingID is taken when recording_id is absent.
    recording_id = text_field(fields, "recording_id", 64) or text_field(fields, "RecordingID", 64)
    if recording_id is None:
        raise BadParameter("recording_id", "recording_id is required")
    if not RECORDING_ID.match(recording_id):
        raise BadParameter("recording_id", "recording_id may hold only letters, digits, . _ and -")
    # The text is kept exactly as sent (byte-exact), line breaks and all; only NUL, which no
    # database text column holds, is refused.
    text = fields.get("transcription")
    if text is not None and "\0" in text:
        raise BadParameter("transcription", "transcription contains a NUL character")
    error = text_field(fields, "error", 2000)
    if text is None and error is None:
        raise BadParameter("transcription", "transcription (or error) is required")
    details = {"call_uuid": text_field(fields, "call_uuid", 64)}
    details.update({name: _number(fields, name) for name in NUMERIC_FIELDS})
    return TranscriptReport(
        recording_id=recording_id,
        text=text,
        error=error,
        details={k: v for k, v in details.items() if v is not None},
    )


def document(
    recording_id: str, status: str, text: str | None, error: str | None, details: Mapping[str, Any]
) -> bytes:
    """The transcript as archived beside the audio: canonical JSON, UTF-8 (text byte-exact)."""
    body = {
        "recording_id": recording_id,
        "status": status,
        "transcription": text,
        "error": error,
        "plivo": dict(details),
    }
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def transcript_document(transcript: Transcript) -> bytes:
    """The archived document of a stored transcript (its text must be loaded)."""
    return document(
        transcript.recording_id,
        transcript.status,
        transcript.text,
        transcript.error,
        transcript.details,
    )


def _values(report: TranscriptReport, source: str, now: dt.datetime) -> dict[str, Any]:
    details = {**report.details, "source": source, "received_at": now.isoformat()}
    body = document(report.recording_id, report.status, report.text, report.error, details)
    return {
        "status": report.status,
        "text": report.text,
        "chars": None if report.text is None else len(report.text),
        "error": report.error,
        "details": details,
        "sha256": hashlib.sha256(body).hexdigest(),
        "received_at": now,
        "archive_next_attempt_at": None,
    }


def store_report(session: Session, report: TranscriptReport, source: str) -> bool:
    """Store a transcript once per recording; False when one was already received.

    A row that was only ordered (`transcripts order`) takes the first transcript that comes;
    the conditional update lets exactly one of two simultaneous arrivals win.
    """
    now = utcnow()
    values = _values(report, source, now)
    inserted = insert_ignoring_conflict(
        session,
        Transcript,
        {**values, "recording_id": report.recording_id, "archive_attempts": 0, "created_at": now},
    )
    if inserted:
        return True
    filled = session.execute(
        update(Transcript)
        .where(Transcript.recording_id == report.recording_id, Transcript.status == ORDERED)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(filled) == 1


def store_transcription(session: Session, fields: Mapping[str, str]) -> Outcome:
    """A transcription callback: stored once per recording, whether or not the recording's own
    callback has come yet."""
    report = parse_transcription(fields)
    is_new = store_report(session, report, source="callback")
    return Outcome(
        {
            "status": "accepted" if is_new else "duplicate",
            "recording_id": report.recording_id,
        },
        recording_id=report.recording_id,
        duplicate=not is_new,
    )


def mark_ordered(session: Session, recording_id: str) -> bool:
    """Note that a transcript was ordered from Plivo, so it is not ordered twice."""
    now = utcnow()
    return insert_ignoring_conflict(
        session,
        Transcript,
        {
            "recording_id": recording_id,
            "status": ORDERED,
            "details": {"ordered_at": now.isoformat()},
            "archive_attempts": 0,
            "created_at": now,
        },
    )


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_json(transcript: Transcript) -> dict[str, Any]:
    """A transcript in full, as GET /api/recordings/<id>/transcript shows it."""
    details = dict(transcript.details or {})
    return {
        "recording_id": transcript.recording_id,
        "status": transcript.status,
        "text": transcript.text,
        "chars": transcript.chars,
        "sha256": transcript.sha256,
        "error": transcript.error,
        "source": details.pop("source", None),
        "received_at": _iso(transcript.received_at),
        "plivo": {k: v for k, v in details.items() if k != "received_at"},
        "archive": None
        if transcript.archived_at is None
        else {
            "key": transcript.archive_key,
            "size": transcript.archive_size,
            "sha256": transcript.sha256,
            "version_id": transcript.archive_version_id,
            "archived_at": _iso(transcript.archived_at),
        },
        "archive_error": transcript.archive_error,
    }


def find(session: Session, recording_id: str) -> Transcript | None:
    """A recording's transcript with its text."""
    return session.scalars(
        select(Transcript)
        .where(Transcript.recording_id == recording_id)
        .options(undefer(Transcript.text))
    ).one_or_none()
