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
    archive_seconds: Mapped[float | None] = mapped_column(Float)

    participants: Mapped[list[Participant]] = relationship(
        back_populates="recording", order_by="Participant.id", cascade="all, delete-orphan"
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
    )


class Participant(Base):
    """A conference member as snapshotted when the recording started."""

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

    recording: Mapped[Recording] = relationship(back_populates="participants")

    __table_args__ = (
        Index("ix_participants_recording_pk", "recording_pk"),
        Index("ix_participants_from_key", "from_key"),
        Index("ix_participants_to_key", "to_key"),
    )


class CallbackLog(Base):
    """Every accepted callback exactly as it arrived (append-only)."""

    __tablename__ = "callback_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    recording_id: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(8))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    headers: Mapped[dict[str, Any]] = mapped_column(JSON)
    body: Mapped[str] = mapped_column(Text)
    query: Mapped[str] = mapped_column(Text)
    signature_verdict: Mapped[str] = mapped_column(String(16))
    nonce: Mapped[str] = mapped_column(String(128))
    duplicate: Mapped[bool] = mapped_column(Boolean, default=False)


class SeenNonce(Base):
    """Signature nonces already accepted, kept for a window so a replay is refused."""

    __tablename__ = "seen_nonces"

    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


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
    """When a periodic chore (nonce pruning, reconcile) is next due; one worker claims each turn."""

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


class CallbackRefusal(Base):
    """How many callbacks were refused, per reason and minute (refusals store nothing else)."""

    __tablename__ = "callback_refusals"

    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
