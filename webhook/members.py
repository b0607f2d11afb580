"""Who was on the call: conference members folded from member events, snapshots and re-reads,
and each recording's participants, the members present while it ran.

A member is one call's presence in one conference (`ConferenceMember`), with the time it joined
and left. Three sources feed it: Conference XML's member events (`enter`, `exit`), the snapshot
taken when a recording starts through the API, and re-reads of Retrieve Conference while a
recording runs. Who the member is (from, to, caller name, direction) comes with snapshots and
re-reads; for events the worker asks the Call API (`webhook.archive.members`).

A recording's participants are materialised as rows of `participants`, recomputed whenever a
member of its conference or the recording's own times change, so that `participant=` search
stays a lookup on the indexed `from_key`/`to_key` of that table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from webhook.errors import BadParameter
from webhook.models import ConferenceMember, MemberEvent, Participant, Recording, Status, utcnow
from webhook.recordings import (
    MAX_DURATION_MS,
    insert_ignoring_conflict,
    participant_key,
    text_field,
)

MEMBER_ACTIONS = ("enter", "exit")
# A member whose conference run is not known on both sides, and whose exit was never learnt,
# counts for a recording only if it was seen this close to the recording's start or later: a
# name is reused every day, and yesterday's caller whose exit was lost must not join today.
UNSETTLED_SLACK = dt.timedelta(minutes=5)
MEMBER_DETAILS = ("from_number", "to_number", "caller_name", "direction")


@dataclass(frozen=True)
class MemberEventReport:
    """A member event of a Conference XML callbackUrl, validated."""

    action: str
    conference_name: str
    member_id: str
    conference_uuid: str | None
    call_uuid: str | None
    from_number: str | None
    to_number: str | None

    @property
    def key(self) -> str:
        """What makes the event itself: Plivo's retries of it share this key."""
        parts = (
            self.action,
            self.conference_name,
            self.conference_uuid or "",
            self.member_id,
            self.call_uuid or "",
        )
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def parse_member_event(fields: Mapping[str, str]) -> MemberEventReport:
    """Validate a member event's fields; a bad one raises BadParameter naming it."""
    action = (text_field(fields, "ConferenceAction", 16, required=True) or "").lower()
    if action not in MEMBER_ACTIONS:
        raise BadParameter("ConferenceAction", "ConferenceAction must be enter or exit")
    name = text_field(fields, "ConferenceName", 255, required=True)
    member_id = text_field(fields, "ConferenceMemberID", 64, required=True)
    conference_uuid = text_field(fields, "ConferenceUUID", 64)
    call_uuid = text_field(fields, "CallUUID", 64)
    if call_uuid is None and conference_uuid is None:
        # Member ids restart with every run of a conference: alone they name nobody.
        raise BadParameter("CallUUID", "CallUUID is required when ConferenceUUID is not given")
    assert name is not None and member_id is not None
    return MemberEventReport(
        action=action,
        conference_name=name,
        member_id=member_id,
        conference_uuid=conference_uuid,
        call_uuid=call_uuid,
        # Whether Plivo sends From/To with member events is unverified: taken when present.
        from_number=text_field(fields, "From", 255),
        to_number=text_field(fields, "To", 255),
    )


def _identity(call_uuid: str | None, run: str, member_id: str | None) -> str:
    return call_uuid if call_uuid else f"member:{run}:{member_id or ''}"[:160]


def _locked_member(
    session: Session, conference_name: str, identity: str, first: Mapping[str, Any]
) -> ConferenceMember:
    """The member row, created if new, locked for this transaction (concurrent events of the
    same member wait for each other rather than lose one another's times)."""
    insert_ignoring_conflict(
        session,
        ConferenceMember,
        {
            "conference_name": conference_name,
            "identity": identity,
            "details_attempts": 0,
            "created_at": utcnow(),
            **first,
        },
    )
    return session.scalars(
        select(ConferenceMember)
        .where(
            ConferenceMember.conference_name == conference_name,
            ConferenceMember.identity == identity,
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()


def record_member_event(
    session: Session, event: MemberEventReport, now: dt.datetime | None = None
) -> bool:
    """Store a member event as received and fold it into its member; False for a repeat.

    Plivo's member events carry no time of their own (as far as is known): the time of receipt
    is the time of the event. Arrival order is not event order, so an exit that arrives before
    its enter keeps its time, and the enter then cannot move the join after the exit.
    """
    now = now or utcnow()
    stored = insert_ignoring_conflict(
        session,
        MemberEvent,
        {
            "received_at": now,
            "action": event.action,
            "conference_name": event.conference_name,
            "conference_uuid": event.conference_uuid,
            "member_id": event.member_id,
            "call_uuid": event.call_uuid,
            "from": event.from_number,
            "to": event.to_number,
            "event_key": event.key,
        },
    )
    if not stored:
        return False
    member = _locked_member(
        session,
        event.conference_name,
        _identity(event.call_uuid, event.conference_uuid or "", event.member_id),
        {"last_seen_at": now, "source": "event", "details_next_at": now},
    )
    previous_id = member.member_id
    member.member_id = previous_id or event.member_id
    member.call_uuid = member.call_uuid or event.call_uuid
    member.conference_uuid = member.conference_uuid or event.conference_uuid
    member.from_number = member.from_number or event.from_number
    member.to_number = member.to_number or event.to_number
    if event.action == "enter":
        rejoined = previous_id not in (None, event.member_id)
        if rejoined and member.left_at is not None and now > member.left_at:
            # The same call back in the conference under a new member id: present again.
            member.left_at = None
            member.member_id = event.member_id
        joined = now if member.left_at is None else min(now, member.left_at)
        if member.joined_at is None or joined < member.joined_at:
            member.joined_at = joined
            member.source = "event"
    else:
        if member.left_at is None or now > member.left_at:
            member.left_at = now
            # The latest stint's id: its enter, arriving after it, must not reopen the member.
            member.member_id = event.member_id
        if member.joined_at is not None and member.joined_at > member.left_at:
            member.joined_at = member.left_at
    member.last_seen_at = max(member.last_seen_at, now)
    if event.conference_uuid:
        _learn_conference_uuid(session, event.conference_name, event.conference_uuid, now)
    session.flush()
    refresh_recordings_of(session, member)
    return True


def _learn_conference_uuid(
    session: Session, name: str, conference_uuid: str, now: dt.datetime
) -> None:
    """A recording running in this conference (started through the API) learns its run's UUID."""
    session.execute(
        update(Recording)
        .where(
            Recording.conference_name == name,
            Recording.status == Status.RECORDING,
            Recording.conference_uuid.is_(None),
            Recording.start_ms <= int(now.timestamp() * 1000),
        )
        .values(conference_uuid=conference_uuid)
        .execution_options(synchronize_session=False)
    )


def _join_time_seconds(raw: Any) -> float | None:
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds < 7 * 24 * 3600 else None


def observe_members(
    session: Session,
    conference_name: str,
    members: Iterable[Mapping[str, Any]],
    source: str,
    now: dt.datetime,
    conference_uuid: str | None = None,
    run: str = "",
) -> list[ConferenceMember]:
    """Merge the members Retrieve Conference shows at `now` (a snapshot or a re-read): a member
    seen before is the same row, its times kept; `join_time` (seconds in the conference) gives
    when it joined. `run` names the members that come without a call UUID."""
    seen = []
    for raw in sorted(members, key=lambda m: str(m.get("call_uuid") or m.get("member_id"))):

        def field(name: str, limit: int, member: Mapping[str, Any] = raw) -> str | None:
            value = member.get(name)
            return None if value in (None, "") else str(value)[:limit]

        call_uuid = field("call_uuid", 64)
        member_id = field("member_id", 64)
        seconds = _join_time_seconds(raw.get("join_time"))
        joined = now - dt.timedelta(seconds=seconds) if seconds is not None else now
        member = _locked_member(
            session,
            conference_name,
            _identity(call_uuid, conference_uuid or run, member_id),
            {"last_seen_at": now, "source": source, "joined_at": joined, "details_next_at": now},
        )
        member.member_id = member.member_id or member_id
        member.call_uuid = member.call_uuid or call_uuid
        member.conference_uuid = member.conference_uuid or conference_uuid
        member.join_time = field("join_time", 32) or member.join_time
        for attribute, name, limit in (
            ("from_number", "from", 255),
            ("to_number", "to", 255),
            ("caller_name", "caller_name", 255),
            ("direction", "direction", 16),
        ):
            value = field(name, limit)
            if value is not None:
                setattr(member, attribute, value)
        if member.from_number or member.to_number:
            # Retrieve Conference said who it is: no need to ask the Call API.
            member.details_at = member.details_at or now
        # The source stays the first that knew the member: a re-read's join time, computed from
        # whole seconds, can come out a moment earlier for the very same join.
        if member.joined_at is None or joined < member.joined_at:
            member.joined_at = joined
        # Present now: an exit learnt earlier (a poll that missed it, a lost event) was wrong.
        if member.left_at is not None and member.left_at < now:
            member.left_at = None
        member.last_seen_at = max(member.last_seen_at, now)
        seen.append(member)
    session.flush()
    return seen


def close_absent_members(
    session: Session,
    conference_name: str,
    present: Iterable[ConferenceMember],
    since: dt.datetime,
    now: dt.datetime,
) -> list[ConferenceMember]:
    """Members of this conference seen since `since` and without an exit, but absent from a
    re-read at `now`: they left (at the latest now)."""
    present_ids = {m.id for m in present}
    absent = [
        m
        for m in session.scalars(
            select(ConferenceMember)
            .where(
                ConferenceMember.conference_name == conference_name,
                ConferenceMember.last_seen_at >= since,
                ConferenceMember.left_at.is_(None),
            )
            .order_by(ConferenceMember.identity)
            .with_for_update()
        )
        if m.id not in present_ids
    ]
    for member in absent:
        member.left_at = now
        member.last_seen_at = max(member.last_seen_at, now)
    session.flush()
    return absent


# --- participants: the members present while a recording ran ------------------------------------


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def recording_span_ms(recording: Recording) -> tuple[int, int | None]:
    """When a recording ran, in epoch ms; the end is None while it still runs."""
    if recording.end_ms is not None:
        return recording.start_ms, recording.end_ms
    if recording.status == Status.RECORDING:
        return recording.start_ms, None
    if recording.duration_ms is not None:
        return recording.start_ms, recording.start_ms + recording.duration_ms
    # The callback comes when the recording ends: its arrival bounds the end.
    return recording.start_ms, _ms(recording.updated_at)


def was_present(member: ConferenceMember, recording: Recording) -> bool:
    """Whether the member's presence overlaps the recording, in the same run of the conference."""
    if member.conference_name != recording.conference_name:
        return False
    settled = bool(member.conference_uuid and recording.conference_uuid)
    if settled and member.conference_uuid != recording.conference_uuid:
        return False
    start, end = recording_span_ms(recording)
    if member.joined_at is not None and end is not None and _ms(member.joined_at) >= end:
        return False
    if member.left_at is not None:
        return _ms(member.left_at) > start
    return settled or member.last_seen_at >= _from_ms(start) - UNSETTLED_SLACK


def _from_ms(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value / 1000, dt.UTC)


def _candidates(session: Session, recording: Recording) -> list[ConferenceMember]:
    """Members that may have been present: of the same run, or seen since shortly before the
    start (the index on (conference_name, last_seen_at) bounds the second)."""
    if recording.conference_name is None:
        return []
    seen_since = _from_ms(recording.start_ms) - UNSETTLED_SLACK
    same_name = ConferenceMember.conference_name == recording.conference_name
    conditions = [and_(same_name, ConferenceMember.last_seen_at >= seen_since)]
    if recording.conference_uuid:
        conditions.append(
            and_(same_name, ConferenceMember.conference_uuid == recording.conference_uuid)
        )
    return list(session.scalars(select(ConferenceMember).where(or_(*conditions))))


def participant_values(member: ConferenceMember) -> dict[str, Any]:
    """The columns of a participant row copied from its member."""
    return {
        "member_id": member.member_id,
        "from_number": member.from_number,
        "to_number": member.to_number,
        "from_key": participant_key(member.from_number),
        "to_key": participant_key(member.to_number),
        "caller_name": member.caller_name,
        "direction": member.direction,
        "call_uuid": member.call_uuid,
        "join_time": member.join_time,
        "joined_at": member.joined_at,
        "left_at": member.left_at,
        "source": member.source,
    }


def _table_columns(values: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute names as the table's column names, for Core inserts ("from", "to")."""
    renamed = {"from_number": "from", "to_number": "to"}
    return {renamed.get(name, name): value for name, value in values.items()}


def refresh_participants(session: Session, recording: Recording) -> None:
    """Make the recording's participant rows the members present while it ran (snapshots taken
    by older versions, without a member, stay)."""
    present = {m.id: m for m in _candidates(session, recording) if was_present(m, recording)}
    existing = {
        p.member_pk: p
        for p in session.scalars(
            select(Participant).where(
                Participant.recording_pk == recording.id, Participant.member_pk.is_not(None)
            )
        )
    }
    gone = [pk for pk in existing if pk not in present]
    if gone:
        session.execute(
            delete(Participant)
            .where(Participant.recording_pk == recording.id, Participant.member_pk.in_(gone))
            .execution_options(synchronize_session=False)
        )
    for pk, member in present.items():
        values = participant_values(member)
        row = existing.get(pk)
        if row is None:
            insert_ignoring_conflict(
                session,
                Participant,
                {"recording_pk": recording.id, "member_pk": pk, **_table_columns(values)},
            )
            continue
        for name, value in values.items():
            if getattr(row, name) != value:
                setattr(row, name, value)
    session.flush()
    session.expire(recording, ["participants"])


def refresh_recording(session: Session, recording_id: str) -> None:
    """Recompute one recording's participants (after its callback gave its times)."""
    recording = session.scalars(
        select(Recording).where(Recording.recording_id == recording_id).with_for_update()
    ).one_or_none()
    if recording is not None:
        refresh_participants(session, recording)


def refresh_recordings_of(session: Session, member: ConferenceMember) -> None:
    """Recompute the participants of every recording this member's presence may touch: of its
    conference, started before it left, and not ended before it joined. A member's presence only
    grows (joins move earlier, exits later), so no recording outside that can have held it."""
    latest = _ms(member.left_at) if member.left_at is not None else _ms(utcnow())
    earliest = member.joined_at or member.left_at or member.last_seen_at
    query = select(Recording).where(
        Recording.conference_name == member.conference_name,
        Recording.start_ms <= latest,
        Recording.start_ms >= _ms(earliest) - MAX_DURATION_MS,
    )
    if member.joined_at is not None:
        joined = _ms(member.joined_at)
        query = query.where(or_(Recording.end_ms.is_(None), Recording.end_ms > joined))
    for recording in session.scalars(query.order_by(Recording.id).with_for_update()).all():
        refresh_participants(session, recording)


def copy_details_to_participants(session: Session, member: ConferenceMember) -> None:
    """After the Call API said who a member is, its participant rows say it too."""
    values = participant_values(member)
    session.execute(
        update(Participant)
        .where(Participant.member_pk == member.id)
        .values(_table_columns({k: values[k] for k in (*MEMBER_DETAILS, "from_key", "to_key")}))
        .execution_options(synchronize_session=False)
    )


# --- the recording notice hooks in here -----------------------------------------------------------


def members_to_notify(session: Session, limit: int = 100) -> list[ConferenceMember]:
    """Members present now in a conference being recorded (through the API) and not yet known to
    have been told: the one place a newly entered member of a recorded conference is noticed.
    Whoever tells them sets `notified_at`."""
    found: dict[int, ConferenceMember] = {}
    running = session.scalars(
        select(Recording).where(Recording.status == Status.RECORDING).order_by(Recording.id)
    )
    for recording in running:
        for member in _candidates(session, recording):
            waiting = member.left_at is None and member.notified_at is None
            if waiting and was_present(member, recording):
                found.setdefault(member.id, member)
    return sorted(found.values(), key=lambda m: m.id)[:limit]
