"""The database schema as SQLAlchemy 2.0 typed models (created only through Alembic migrations)."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Status(enum.StrEnum):
    """Where a recording is in its life: recording → pending → archiving → archived | failed."""

    RECORDING = "recording"
    PENDING = "pending"
    ARCHIVING = "archiving"
    ARCHIVED = "archived"
    FAILED = "failed"


class Role(enum.StrEnum):
    """What a staff token may do; admin may do everything."""

    COMPLIANCE = "compliance"
    OPERATOR = "operator"
    ADMIN = "admin"


class Base(DeclarativeBase):
    pass


class Recording(Base):
    """One Plivo recording: its metadata, its place in the archive queue and its archived object."""

    __tablename__ = "recordings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recording_id: Mapped[str] = mapped_column(String(64), unique=True)
    conference_name: Mapped[str | None] = mapped_column(String(255))
    api_id: Mapped[str | None] = mapped_column(String(64))
    record_url: Mapped[str | None] = mapped_column(Text)
    file_format: Mapped[str | None] = mapped_column(String(8))
    duration_s: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    end_ms: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # For a pending row, when it may be tried; for an archiving row, when its lease expires.
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    lease_token: Mapped[str | None] = mapped_column(String(36))
    last_error: Mapped[str | None] = mapped_column(Text)
    archive_key: Mapped[str | None] = mapped_column(String(512))
    archive_size: Mapped[int | None] = mapped_column(BigInteger)
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    archive_version_id: Mapped[str | None] = mapped_column(String(1024))
    archived_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    retain_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    legal_hold_reason: Mapped[str | None] = mapped_column(Text)
    started_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # When the recording was deleted from Plivo after its archived copy was re-read and matched.
    plivo_deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Set when a re-read of the archived object did not match its SHA-256: never deleted then.
    archive_mismatch: Mapped[str | None] = mapped_column(Text)
    # Plivo's id of the conference's run: a name is reused every day, this is not.
    conference_uuid: Mapped[str | None] = mapped_column(String(64))
    # How long archiving took (download, upload and check), for the archive-duration metric.
    archive_seconds: Mapped[float | None] = mapped_column(Float)

    participants: Mapped[list[Participant]] = relationship(
        back_populates="recording", order_by="Participant.id", cascade="all, delete-orphan"
    )
    # Keyed by recording_id, not a foreign key: a transcript may be stored before its recording.
    transcript: Mapped[Transcript | None] = relationship(
        primaryjoin="foreign(Transcript.recording_id) == Recording.recording_id",
        viewonly=True,
        uselist=False,
    )

    __table_args__ = (
        # Pattern ops: the same index serves `conference =` and `conference_prefix` (LIKE 'x%')
        # whatever the database's collation.
        Index(
            "ix_recordings_conference_name",
            "conference_name",
            postgresql_ops={"conference_name": "varchar_pattern_ops"},
        ),
        Index("ix_recordings_start_ms_id", "start_ms", "id"),
        Index("ix_recordings_status_start_ms_id", "status", "start_ms", "id"),
        Index(
            "ix_recordings_held_start_ms_id",
            "start_ms",
            "id",
            postgresql_where=text("legal_hold"),
            sqlite_where=text("legal_hold = 1"),
        ),
        # The archive queue: only rows a worker may claim, in the order it claims them.
        Index(
            "ix_recordings_queue",
            "next_attempt_at",
            postgresql_where=text("status IN ('pending', 'archiving')"),
            sqlite_where=text("status IN ('pending', 'archiving')"),
        ),
        # Recordings that may one day be deleted from Plivo, by when they ended.
        Index(
            "ix_recordings_plivo_delete_due",
            "end_ms",
            postgresql_where=text("status = 'archived' AND plivo_deleted_at IS NULL"),
            sqlite_where=text("status = 'archived' AND plivo_deleted_at IS NULL"),
        ),
    )


class Participant(Base):
    """A member present while a recording ran: a copy of its conference member (`member_pk`),
    recomputed when events, re-reads or the recording's times arrive, or a snapshot taken at the
    start by an older version (no `member_pk`)."""

    __tablename__ = "participants"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recording_pk: Mapped[int] = mapped_column(ForeignKey("recordings.id", ondelete="CASCADE"))
    member_id: Mapped[str | None] = mapped_column(String(64))
    from_number: Mapped[str | None] = mapped_column("from", String(255))
    to_number: Mapped[str | None] = mapped_column("to", String(255))
    from_key: Mapped[str | None] = mapped_column(String(255))
    to_key: Mapped[str | None] = mapped_column(String(255))
    caller_name: Mapped[str | None] = mapped_column(String(255))
    direction: Mapped[str | None] = mapped_column(String(16))
    call_uuid: Mapped[str | None] = mapped_column(String(64))
    join_time: Mapped[str | None] = mapped_column(String(32))
    member_pk: Mapped[int | None] = mapped_column(
        ForeignKey("conference_members.id", ondelete="CASCADE")
    )
    joined_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    left_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Where the join was learnt: event (Conference XML callbackUrl), snapshot (at the start of
    # a recording through the API) or poll (a re-read of the conference while recording).
    source: Mapped[str | None] = mapped_column(String(16))

    recording: Mapped[Recording] = relationship(back_populates="participants")

    __table_args__ = (
        Index("ix_participants_recording_pk", "recording_pk"),
        Index("ix_participants_from_key", "from_key"),
        Index("ix_participants_to_key", "to_key"),
        UniqueConstraint("recording_pk", "member_pk", name="uq_participants_recording_member"),
        Index("ix_participants_member_pk", "member_pk"),
    )


class CallbackLog(Base):
    """Every accepted callback exactly as it arrived (append-only).

    Its nonce is unique: the log is also the record of nonces used, kept as long as the signed
    requests themselves, so no logged request can be replayed.
    """

    __tablename__ = "callback_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    recording_id: Mapped[str | None] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(8))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    headers: Mapped[dict[str, Any]] = mapped_column(JSON)
    body: Mapped[str] = mapped_column(Text)
    query: Mapped[str] = mapped_column(Text)
    signature_verdict: Mapped[str] = mapped_column(String(16))
    nonce: Mapped[str] = mapped_column(String(128))
    duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    # recording, member (a conference member event) or transcription
    kind: Mapped[str] = mapped_column(String(16), server_default="recording")

    __table_args__ = (UniqueConstraint("nonce", name="uq_callback_log_nonce"),)


class LegalHoldEvent(Base):
    """Every placing or lifting of a legal hold, with who and why (append-only)."""

    __tablename__ = "legal_hold_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recording_id: Mapped[str] = mapped_column(String(64), index=True)
    on: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    staff_name: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Schedule(Base):
    """When a periodic chore (reconcile, auto-record…) is next due; one worker claims each turn."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_run_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Staff(Base):
    """A person (or script) holding an API token; only the token's SHA-256 is kept."""

    __tablename__ = "staff"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        # A name belongs to one active member; once revoked it may be given again.
        Index(
            "uq_staff_active_name",
            "name",
            unique=True,
            postgresql_where=text("revoked_at IS NULL"),
            sqlite_where=text("revoked_at IS NULL"),
        ),
    )


class AuditEvent(Base):
    """One staff request to the API (append-only; the database refuses updates and deletes)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    staff_name: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    query: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(64))
    # The decoded query parameters as the service read them: {name: [values]} in full.
    params: Mapped[dict[str, list[str]] | None] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_audit_events_at_id", "at", "id"),
        Index("ix_audit_events_staff_name", "staff_name"),
    )


class AuditRecording(Base):
    """Which recordings one audited request touched, so the log can be searched by recording."""

    __tablename__ = "audit_recordings"

    audit_id: Mapped[int] = mapped_column(
        ForeignKey("audit_events.id", ondelete="RESTRICT"), primary_key=True
    )
    recording_id: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index("ix_audit_recordings_recording_id", "recording_id"),)


class ConsoleSession(Base):
    """A signed-in console session: only the SHA-256 of its random id is kept.

    `token_hash` is the staff token the session was opened with, so revoking or rotating the
    token ends the session on its next request.
    """

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    staff_id: Mapped[int] = mapped_column(ForeignKey("staff.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_console_sessions_last_seen_at", "last_seen_at"),)


class AuditAnonymous(Base):
    """API requests from no identified staff member, counted per client address, minute and
    status with one bounded sample (the count may only grow; rows are never deleted)."""

    __tablename__ = "audit_anonymous"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    remote_addr: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger)
    first_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(256))
    user_agent: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (
        UniqueConstraint("window_start", "remote_addr", "status", name="uq_audit_anonymous_window"),
    )


class ReconcileRun(Base):
    """How far a `reconcile --since` has got through Plivo's list windows, so a run resumes."""

    __tablename__ = "reconcile_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    since: Mapped[dt.datetime] = mapped_column(UTCDateTime, unique=True)
    done_until: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConferenceClaim(Base):
    """Who is recording a live conference: one row per conference, so one recording is started.

    Taken before Plivo is asked to record, by the API and by auto-record alike; released when the
    recording ends, when the start fails, or found stale when the conference has run since.
    """

    __tablename__ = "conference_claims"

    conference_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    token: Mapped[str] = mapped_column(String(36))
    claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str] = mapped_column(String(64))
    recording_id: Mapped[str | None] = mapped_column(String(64), index=True)


class RecordingNotice(Base):
    """Each recording notice played (or failed) to a conference member (append-only)."""

    __tablename__ = "recording_notices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recording_pk: Mapped[int] = mapped_column(ForeignKey("recordings.id", ondelete="RESTRICT"))
    member_id: Mapped[str] = mapped_column(String(64))
    call_uuid: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_recording_notices_recording_pk", "recording_pk", "member_id"),)


class PlivoDeletion(Base):
    """Each attempt to delete a recording from Plivo, and each refusal to (append-only)."""

    __tablename__ = "plivo_deletions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recording_id: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)


# Transcripts waiting for the archive (the audio's archiving decides when they may go).
TRANSCRIPTS_UNARCHIVED = text("archived_at IS NULL AND sha256 IS NOT NULL")


class Transcript(Base):
    """Plivo's transcript of a recording, one per recording, stored as first received.

    Keyed by Plivo's recording id without a foreign key: a transcript may arrive before the
    recording's own callback. `sha256` is the digest of the JSON document archived beside the
    audio (webhook.transcripts.document), known from the moment the transcript is stored.
    """

    __tablename__ = "transcripts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recording_id: Mapped[str] = mapped_column(String(64), unique=True)
    # received (text, perhaps empty), error (Plivo could not transcribe), ordered (asked for)
    status: Mapped[str] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text, deferred=True)
    chars: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # Plivo's own fields (call_uuid, duration, charge, rate…) as signed strings, with the source
    # (callback or api) and the time of receipt.
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    archive_key: Mapped[str | None] = mapped_column(String(512))
    archive_size: Mapped[int | None] = mapped_column(BigInteger)
    archive_version_id: Mapped[str | None] = mapped_column(String(1024))
    archived_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # While archiving: when the claim lapses; after a failure: when to try again.
    archive_next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    archive_attempts: Mapped[int] = mapped_column(Integer, default=0)
    archive_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index(
            "ix_transcripts_unarchived",
            "id",
            postgresql_where=TRANSCRIPTS_UNARCHIVED,
            sqlite_where=TRANSCRIPTS_UNARCHIVED,
        ),
    )


class ConferenceMember(Base):
    """One call's presence in one conference: who (filled from the Call API when an event did not
    say), when it joined and left, and where that was learnt. Folded from member events, member
    snapshots and re-reads; a recording's participants are copied from the members present while
    it ran."""

    __tablename__ = "conference_members"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conference_name: Mapped[str] = mapped_column(String(255))
    conference_uuid: Mapped[str | None] = mapped_column(String(64))
    # The call's UUID, or (without one) the member id within its conference run or recording.
    identity: Mapped[str] = mapped_column(String(160))
    member_id: Mapped[str | None] = mapped_column(String(64))
    call_uuid: Mapped[str | None] = mapped_column(String(64))
    from_number: Mapped[str | None] = mapped_column("from", String(255))
    to_number: Mapped[str | None] = mapped_column("to", String(255))
    caller_name: Mapped[str | None] = mapped_column(String(255))
    direction: Mapped[str | None] = mapped_column(String(16))
    join_time: Mapped[str | None] = mapped_column(String(32))
    joined_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    left_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The last moment the member was known to be in the conference (or its exit).
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String(16))
    # Who the member is, from the Call API: done when details_at is set; retried until then.
    details_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    details_attempts: Mapped[int] = mapped_column(Integer, default=0)
    details_next_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    details_error: Mapped[str | None] = mapped_column(Text)
    # When the member was told the conference is recorded; null: not (yet) known to be told.
    notified_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("conference_name", "identity", name="uq_conference_members_identity"),
        Index("ix_conference_members_name_last_seen", "conference_name", "last_seen_at"),
        Index("ix_conference_members_conference_uuid", "conference_uuid"),
        Index(
            "ix_conference_members_details_due",
            "details_next_at",
            postgresql_where=text("details_at IS NULL"),
            sqlite_where=text("details_at IS NULL"),
        ),
    )


class MemberEvent(Base):
    """A conference member event (enter, exit) as received, once each (append-only)."""

    __tablename__ = "member_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(String(16))
    conference_name: Mapped[str] = mapped_column(String(255))
    conference_uuid: Mapped[str | None] = mapped_column(String(64))
    member_id: Mapped[str] = mapped_column(String(64))
    call_uuid: Mapped[str | None] = mapped_column(String(64))
    from_number: Mapped[str | None] = mapped_column("from", String(255))
    to_number: Mapped[str | None] = mapped_column("to", String(255))
    # SHA-256 of what makes the event itself: Plivo's retries of it share this key.
    event_key: Mapped[str] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("event_key", name="uq_member_events_event_key"),)


class CallbackRefusal(Base):
    """How many callbacks were refused, per reason and minute (refusals store nothing else)."""

    __tablename__ = "callback_refusals"

    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
