"""Telling conference members they are being recorded: Plivo's Speak or Play, each outcome kept."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from webhook.db import transaction
from webhook.errors import PlivoError
from webhook.models import (
    ConferenceMember,
    Participant,
    Recording,
    RecordingNotice,
    Status,
    utcnow,
)

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)

PLAYED = "played"
FAILED = "failed"
# Not a stored outcome: the start of the recording is telling the member right now.
WAITING = "waiting"


@dataclass(frozen=True)
class Member:
    """A conference member to tell: Plivo's member id and, where known, its call."""

    member_id: str
    call_uuid: str | None = None


def notice_configured(svc: Services) -> bool:
    """Whether a recording notice is set (RECORDING_NOTICE_TEXT or RECORDING_NOTICE_URL)."""
    return bool(svc.settings.recording_notice_text or svc.settings.recording_notice_url)


def _send(svc: Services, conference_name: str, member_ids: list[str]) -> str | None:
    """Speak or play the notice to these members; the error, or None when Plivo accepted it."""
    s = svc.settings
    try:
        if s.recording_notice_text:
            svc.plivo.speak_to_members(
                conference_name,
                member_ids,
                s.recording_notice_text,
                s.recording_notice_voice,
                s.recording_notice_language,
            )
        elif s.recording_notice_url:
            svc.plivo.play_to_members(conference_name, member_ids, s.recording_notice_url)
    except PlivoError as exc:
        return exc.message[:2000]
    return None


def _store(
    svc: Services,
    recording_pk: int,
    recording_id: str,
    members: Sequence[Member],
    error: str | None,
) -> None:
    now = utcnow()
    outcome = FAILED if error else PLAYED
    with transaction(svc.sessions) as session:
        session.add_all(
            RecordingNotice(
                recording_pk=recording_pk,
                member_id=m.member_id[:64],
                call_uuid=(m.call_uuid or None) and m.call_uuid[:64],
                at=now,
                outcome=outcome,
                error=error,
            )
            for m in members
        )
    log.log(
        logging.WARNING if error else logging.INFO,
        "recording notice %s",
        outcome,
        extra={
            "recording_id": recording_id,
            "member_ids": [m.member_id for m in members],
            "error": error,
        },
    )


def notify_members(
    svc: Services, recording_pk: int, recording_id: str, conference_name: str, members: list[Member]
) -> bool:
    """Tell every member at once (one Plivo request) and store one outcome per member.

    True when Plivo accepted it or no notice is set; a failure is stored and logged, not raised.
    """
    members = [m for m in members if m.member_id]
    if not notice_configured(svc) or not members:
        return True
    error = _send(svc, conference_name, [m.member_id for m in members])
    _store(svc, recording_pk, recording_id, members, error)
    return error is None


def notify_member(
    svc: Services, conference_name: str, member_id: str, call_uuid: str | None = None
) -> str | None:
    """Tell one member who entered a conference while it is being recorded.

    Idempotent per (recording, member): a member already told is not told again (a failed notice
    is tried again). Makes a Plivo request, so call it from a worker, never inside a callback
    request. Answers "played" or "failed"; "waiting" when the start of the recording is telling
    the member right now; None when there was nothing to do (no notice set, the conference is
    not being recorded, or the member was told already).
    """
    if not notice_configured(svc) or not member_id:
        return None
    with transaction(svc.sessions) as session:
        recording = session.execute(
            select(Recording.id, Recording.recording_id, Recording.created_at)
            .where(
                Recording.conference_name == conference_name, Recording.status == Status.RECORDING
            )
            .order_by(Recording.id.desc())
            .limit(1)
        ).first()
        if recording is None:
            return None
        outcomes = set(
            session.scalars(
                select(RecordingNotice.outcome).where(
                    RecordingNotice.recording_pk == recording.id,
                    RecordingNotice.member_id == member_id,
                )
            )
        )
        if PLAYED in outcomes:
            return None
        if not outcomes and _left_to_the_start(session, recording, conference_name, member_id):
            return WAITING
    member = Member(member_id, call_uuid)
    error = _send(svc, conference_name, [member_id])
    _store(svc, recording.id, recording.recording_id, [member], error)
    return FAILED if error else PLAYED


# Whoever starts a recording tells the members present then, in one Plivo request, after the
# recording is committed. For this long, those members are left to it: nobody is told twice.
START_NOTICE_SECONDS = 30


def _left_to_the_start(
    session: Session, recording: Any, conference_name: str, member_id: str
) -> bool:
    """Whether the start of this recording, which has stored no outcome for this member yet, is
    telling the member right now: the member was there when it started, and the start was less
    than START_NOTICE_SECONDS ago (after that, a start that died is taken over)."""
    if recording.created_at < utcnow() - dt.timedelta(seconds=START_NOTICE_SECONDS):
        return False
    there_at_start = session.scalar(
        select(
            exists().where(
                ConferenceMember.conference_name == conference_name,
                ConferenceMember.member_id == member_id,
                ConferenceMember.joined_at <= recording.created_at,
            )
        )
    )
    return bool(there_at_start)


# A notice that keeps failing for one member is not asked of Plivo again and again.
MAX_FAILED_NOTICES = 3
NOTIFY_ENTERED_EVERY_SECONDS = 5


def notify_entered(svc: Services) -> int:
    """Tell the members who entered a conference after its recording started, as member events
    and re-reads of the conference report them; how many were told.

    Each member is told once per recording (a member told at the start is only marked), a failed
    notice is tried again on a later turn, at most MAX_FAILED_NOTICES times. A worker chore:
    Plivo is asked here, never inside a callback request.
    """
    from webhook.members import members_to_notify  # members builds on this module

    if not notice_configured(svc):
        return 0
    with transaction(svc.sessions) as session:
        waiting = [
            (m.id, m.conference_name, m.member_id, m.call_uuid)
            for m in members_to_notify(session)
            if m.member_id
        ]
    told = 0
    for member_pk, conference_name, member_id, call_uuid in waiting:
        assert member_id is not None
        if _failed_notices(svc, conference_name, member_id) >= MAX_FAILED_NOTICES:
            continue
        outcome = notify_member(svc, conference_name, member_id, call_uuid)
        if outcome in (FAILED, WAITING):
            continue
        told += outcome == PLAYED
        with transaction(svc.sessions) as session:
            session.execute(
                update(ConferenceMember)
                .where(ConferenceMember.id == member_pk, ConferenceMember.notified_at.is_(None))
                .values(notified_at=_played_at(session, conference_name, member_id) or utcnow())
            )
    return told


def _recording_notices(conference_name: str, member_id: str) -> Select[RecordingNotice]:
    """The notices of this member in the conference's recording in progress."""
    recording = (
        select(Recording.id)
        .where(Recording.conference_name == conference_name, Recording.status == Status.RECORDING)
        .scalar_subquery()
    )
    return select(RecordingNotice).where(
        RecordingNotice.recording_pk.in_(recording), RecordingNotice.member_id == member_id
    )


def _failed_notices(svc: Services, conference_name: str, member_id: str) -> int:
    notices = _recording_notices(conference_name, member_id).where(
        RecordingNotice.outcome == FAILED
    )
    with svc.sessions() as session:
        return len(session.scalars(notices).all())


def _played_at(session: Session, conference_name: str, member_id: str) -> dt.datetime | None:
    notices = _recording_notices(conference_name, member_id).where(
        RecordingNotice.outcome == PLAYED
    )
    played = session.scalars(notices.order_by(RecordingNotice.id)).first()
    return None if played is None else played.at


# --- showing ----------------------------------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def notices_of(session: Session, recording_pks: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The notices played or failed for many recordings, oldest first, in one query."""
    found: dict[int, list[dict[str, Any]]] = {pk: [] for pk in recording_pks}
    if not recording_pks:
        return found
    rows = session.execute(
        select(
            RecordingNotice.recording_pk,
            RecordingNotice.member_id,
            RecordingNotice.call_uuid,
            RecordingNotice.at,
            RecordingNotice.outcome,
            RecordingNotice.error,
        )
        .where(RecordingNotice.recording_pk.in_(recording_pks))
        .order_by(RecordingNotice.recording_pk, RecordingNotice.id)
    )
    for pk, member_id, call_uuid, at, outcome, error in rows:
        found[pk].append(
            {
                "member_id": member_id,
                "call_uuid": call_uuid,
                "at": _iso(at),
                "outcome": outcome,
                "error": error,
            }
        )
    return found


def notified_at(participant: dict[str, Any], notices: list[dict[str, Any]]) -> str | None:
    """When a participant was first told, matched by member id or call: None if never."""
    for notice in notices:  # oldest first
        if notice["outcome"] != PLAYED:
            continue
        if (participant.get("member_id") and notice["member_id"] == participant["member_id"]) or (
            participant.get("call_uuid") and notice["call_uuid"] == participant["call_uuid"]
        ):
            return str(notice["at"])
    return None


def some_participant_not_notified() -> ColumnElement[bool]:
    """SQL: the recording has a participant no played notice reached (for `notified=false`)."""
    return exists().where(
        Participant.recording_pk == Recording.id,
        ~exists().where(
            RecordingNotice.recording_pk == Participant.recording_pk,
            RecordingNotice.outcome == PLAYED,
            or_(
                RecordingNotice.member_id == Participant.member_id,
                and_(
                    Participant.call_uuid.is_not(None),
                    RecordingNotice.call_uuid == Participant.call_uuid,
                ),
            ),
        ),
    )
