"""The worker's member chores: who each member is (the Call API), and re-reads of the members of
conferences being recorded (Retrieve Conference). Never inside a callback's request; a failure
is retried later and never touches a recording's archiving."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from webhook.db import transaction
from webhook.errors import PlivoError
from webhook.members import (
    UNSETTLED_SLACK,
    close_absent_members,
    copy_details_to_participants,
    observe_members,
    refresh_participants,
)
from webhook.models import ConferenceMember, Recording, Status, utcnow

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)

DETAILS_INTERVAL_SECONDS = 2
DETAILS_BATCH = 20
# Lookups stop for this turn after this long, so the archive loop goes on (the rest wait).
DETAILS_BUDGET_SECONDS = 5.0
# A member being looked up is not taken again by another worker for this long.
DETAILS_LEASE = dt.timedelta(minutes=2)
DETAILS_RETRY_BASE_SECONDS = 15.0
# 15 s doubling: the last attempt comes about an hour after the first. Plivo's call record may
# take a while to exist after hang-up (unverified how long), so a 404 is retried like the rest.
DETAILS_MAX_ATTEMPTS = 9
POLL_CONFERENCES_MAX = 50


def details_retry_delay(attempts: int) -> float:
    """Seconds before the next lookup after `attempts` failed ones (doubling, no jitter: one
    worker per turn does them all)."""
    return DETAILS_RETRY_BASE_SECONDS * 2.0 ** max(attempts - 1, 0)


def _call_details(services: Services, call_uuid: str) -> dict[str, str | None]:
    """Who a call is: the live call while it is up, the call's record after."""
    plivo = services.plivo
    try:
        live = plivo.get_call(call_uuid, live=True)
    except PlivoError as exc:
        if exc.status != 404:
            raise
        ended = plivo.get_call(call_uuid)
        return {
            "from_number": _field(ended, "from_number", "from"),
            "to_number": _field(ended, "to_number", "to"),
            "caller_name": _field(ended, "caller_name"),
            "direction": _field(ended, "call_direction", "direction"),
        }
    return {
        "from_number": _field(live, "from", "from_number"),
        "to_number": _field(live, "to", "to_number"),
        "caller_name": _field(live, "caller_name"),
        "direction": _field(live, "direction", "call_direction"),
    }


def _field(answer: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = answer.get(name)
        if value not in (None, ""):
            return str(value)[: 16 if name.endswith("direction") else 255]
    return None


def _claim_due(session: Session, now: dt.datetime) -> list[tuple[int, str | None]]:
    due = session.execute(
        select(ConferenceMember.id, ConferenceMember.call_uuid)
        .where(ConferenceMember.details_at.is_(None), ConferenceMember.details_next_at <= now)
        .order_by(ConferenceMember.details_next_at)
        .limit(DETAILS_BATCH)
    ).all()
    if due:
        session.execute(
            update(ConferenceMember)
            .where(ConferenceMember.id.in_([pk for pk, _ in due]))
            .values(details_next_at=now + DETAILS_LEASE)
        )
    return [(pk, call_uuid) for pk, call_uuid in due]


def fill_member_details(services: Services, now: dt.datetime | None = None) -> int:
    """Ask the Call API who the members learnt from events are; answer how many were filled."""
    now = now or utcnow()
    with transaction(services.sessions) as session:
        due = _claim_due(session, now)
    started = time.monotonic()
    filled = 0
    for pk, call_uuid in due:
        if time.monotonic() - started > DETAILS_BUDGET_SECONDS:
            # Give the rest back now rather than after their lease.
            with transaction(services.sessions) as session:
                session.execute(
                    update(ConferenceMember)
                    .where(ConferenceMember.id == pk, ConferenceMember.details_at.is_(None))
                    .values(details_next_at=now)
                )
            continue
        details: dict[str, str | None] | None = None
        error = "no call UUID to look up"
        if call_uuid:
            try:
                details = _call_details(services, call_uuid)
            except PlivoError as exc:
                error = f"{exc.code}: {exc.message}"[:2000]
        with transaction(services.sessions) as session:
            member = session.scalars(
                select(ConferenceMember).where(ConferenceMember.id == pk).with_for_update()
            ).one()
            if details is None:
                _note_failure(member, error, give_up=not call_uuid)
                continue
            for name, value in details.items():
                if value is not None and getattr(member, name) is None:
                    setattr(member, name, value)
            member.details_at = utcnow()
            member.details_next_at = None
            member.details_error = None
            session.flush()
            copy_details_to_participants(session, member)
            filled += 1
    return filled


def _note_failure(member: ConferenceMember, error: str, give_up: bool) -> None:
    member.details_attempts += 1
    member.details_error = error
    if give_up or member.details_attempts >= DETAILS_MAX_ATTEMPTS:
        member.details_next_at = None
        log.warning(
            "member details given up",
            extra={
                "call_uuid": member.call_uuid,
                "error": error,
                "attempts": member.details_attempts,
            },
        )
        return
    delay = details_retry_delay(member.details_attempts)
    member.details_next_at = utcnow() + dt.timedelta(seconds=delay)
    log.info(
        "member details unavailable; will retry",
        extra={"call_uuid": member.call_uuid, "error": error, "retry_in_s": delay},
    )


def poll_members(services: Services, now: dt.datetime | None = None) -> int:
    """Re-read the members of every conference being recorded and merge them: late joiners are
    added, members no longer there get their leave time. Answers how many conferences were read."""
    with transaction(services.sessions) as session:
        running = session.execute(
            select(
                Recording.conference_name,
                func.min(Recording.start_ms),
                func.min(Recording.recording_id),
            )
            .where(Recording.status == Status.RECORDING, Recording.conference_name.is_not(None))
            .group_by(Recording.conference_name)
            .order_by(Recording.conference_name)
            .limit(POLL_CONFERENCES_MAX)
        ).all()
    read = 0
    for conference_name, first_start_ms, some_recording_id in running:
        name = str(conference_name)
        try:
            conference: dict[str, Any] | None = services.plivo.get_conference(name)
        except PlivoError as exc:
            if exc.status != 404:
                log.warning("members not re-read: %s", exc.message, extra={"conference": name})
                continue
            conference = None  # over: everyone seen in it has left
        moment = now or utcnow()
        with transaction(services.sessions) as session:
            seen = []
            if conference is not None:
                seen = observe_members(
                    session,
                    name,
                    list(conference.get("members") or []),
                    "poll",
                    moment,
                    conference_uuid=conference.get("conference_uuid") or None,
                    run=some_recording_id,
                )
            since = dt.datetime.fromtimestamp(first_start_ms / 1000, dt.UTC) - UNSETTLED_SLACK
            close_absent_members(session, name, seen, since, moment)
            recordings = session.scalars(
                select(Recording)
                .where(Recording.conference_name == name, Recording.status == Status.RECORDING)
                .order_by(Recording.id)
                .with_for_update()
            ).all()
            for recording in recordings:
                refresh_participants(session, recording)
        read += 1
    return read
