"""Staff tokens and roles: `Authorization: Bearer <token>`, stored only as a SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

from flask import g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from webhook.db import request_session
from webhook.edge import check_request
from webhook.errors import APIError
from webhook.models import Role, Staff, utcnow

TOKEN_PREFIX = "whk_"  # noqa: S105 - a visible prefix, not a secret

P = ParamSpec("P")
R = TypeVar("R")


def hash_token(token: str) -> str:
    """The stored form of a token (tokens are 256 random bits, so a plain SHA-256 is enough)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token, shown once to whoever creates it."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def add_staff(session: Session, name: str, role: Role) -> str:
    """Create a staff member and answer their token (the only time it exists in clear)."""
    token = new_token()
    session.add(Staff(name=name, role=role, token_hash=hash_token(token)))
    return token


def staff_for_token(session: Session, token: str) -> Staff | None:
    """The active staff member holding this token, if any."""
    return session.scalars(
        select(Staff).where(Staff.token_hash == hash_token(token), Staff.revoked_at.is_(None))
    ).one_or_none()


def revoke_staff(session: Session, name: str) -> bool:
    """Revoke a staff member's token; False when there is no active member of that name."""
    staff = session.scalars(
        select(Staff).where(Staff.name == name, Staff.revoked_at.is_(None))
    ).one_or_none()
    if staff is None:
        return False
    staff.revoked_at = utcnow()
    return True


def bearer_token() -> str | None:
    """The token of the request's `Authorization: Bearer <token>` header, if it has one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def rotate_staff(session: Session, name: str) -> str | None:
    """Revoke an active member's token and issue a new one, same name and role (None: no such
    active member). The caller commits both together, so there is never a moment without one."""
    staff = session.scalars(
        select(Staff).where(Staff.name == name, Staff.revoked_at.is_(None)).with_for_update()
    ).one_or_none()
    if staff is None:
        return None
    staff.revoked_at = utcnow()
    # The revocation goes first: the name is unique among active staff only.
    session.flush()
    return add_staff(session, name, Role(staff.role))


def authenticate() -> Staff:
    """The staff member behind the request's bearer token, or 401."""
    token = bearer_token()
    if token is None:
        raise APIError(401, "unauthorized", "An Authorization: Bearer <token> header is required")
    staff = staff_for_token(request_session(), token)
    if staff is None:
        raise APIError(401, "unauthorized", "The token is unknown or revoked")
    g.staff_name = staff.name
    g.staff_role = staff.role
    return staff


def require(*roles: Role) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Let a view run only for staff holding one of `roles` (admin may do everything)."""

    def decorator(view: Callable[P, R]) -> Callable[P, R]:
        @wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            staff = authenticate()
            # After authenticating, so a malformed request is audited under its staff name.
            check_request()
            if staff.role != Role.ADMIN and staff.role not in roles:
                raise APIError(
                    403,
                    "forbidden",
                    f"This needs the {' or '.join(roles)} role; {staff.name} is {staff.role}",
                )
            return view(*args, **kwargs)

        return wrapper

    return decorator
