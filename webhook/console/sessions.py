"""Console sessions kept on the server: the browser holds a random id, the database its SHA-256.

Checked on every request, so sign-out, idle expiry and a revoked (or rotated) staff token end a
session at once, and no signing key is needed. The CSRF token of a session is an HMAC of its id:
only a page served to the holder of the (HttpOnly) cookie can know it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from webhook.auth import hash_token
from webhook.models import ConsoleSession, Staff, utcnow

COOKIE = "console_session"
# On https the __Host- prefix makes the browser insist on Secure, Path=/ and no Domain.
SECURE_COOKIE = "__Host-console_session"
CSRF_FIELD = "csrf_token"


def cookie_name(secure: bool) -> str:
    """The session cookie's name: with the __Host- prefix when it is Secure."""
    return SECURE_COOKIE if secure else COOKIE


def _idle(minutes: float) -> dt.timedelta:
    return dt.timedelta(minutes=minutes)


def open_session(session: Session, staff: Staff, idle_minutes: float) -> str:
    """Start a session for `staff` and answer its id (shown only to the browser, in the cookie).

    Sessions idle for longer than the limit are deleted on the way, so the table stays small.
    """
    now = utcnow()
    session.execute(
        delete(ConsoleSession).where(ConsoleSession.last_seen_at < now - _idle(idle_minutes))
    )
    raw = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            session_hash=hash_token(raw),
            staff_id=staff.id,
            token_hash=staff.token_hash,
            created_at=now,
            last_seen_at=now,
        )
    )
    return raw


def resume(session: Session, raw: str, idle_minutes: float) -> Staff | None:
    """The staff member of a live session, marking it used now; None (and the session deleted)
    when it is unknown, idle too long, or its staff token was revoked or rotated."""
    found = session.execute(
        select(ConsoleSession, Staff)
        .join(Staff, Staff.id == ConsoleSession.staff_id)
        .where(ConsoleSession.session_hash == hash_token(raw))
    ).one_or_none()
    if found is None:
        return None
    console_session, staff = found
    now = utcnow()
    if (
        staff.revoked_at is not None
        or staff.token_hash != console_session.token_hash
        or console_session.last_seen_at < now - _idle(idle_minutes)
    ):
        session.delete(console_session)
        return None
    console_session.last_seen_at = now
    return staff


def end_session(session: Session, raw: str) -> None:
    """Sign out: the session is deleted, its cookie worthless from now on."""
    session.execute(delete(ConsoleSession).where(ConsoleSession.session_hash == hash_token(raw)))


def csrf_token(raw: str) -> str:
    """The CSRF token of the session whose id is `raw`."""
    return hmac.new(raw.encode(), b"console csrf", hashlib.sha256).hexdigest()


def csrf_valid(raw: str, given: str | None) -> bool:
    """Whether a submitted form carries the session's CSRF token (constant-time)."""
    return given is not None and hmac.compare_digest(csrf_token(raw), given)
