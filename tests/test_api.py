"""The staff JSON API: tokens and roles, starting recordings, finding them, exporting, auditing."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError

from tests.conftest import PUBLIC_URL, post_callback, token_for
from webhook import services
from webhook.auth import revoke_staff
from webhook.db import transaction
from webhook.models import (
    AuditAnonymous,
    AuditEvent,
    AuditRecording,
    Participant,
    Recording,
    Role,
    Status,
    utcnow,
)
from webhook.recordings import RecordingReport, archive_key, record_report, record_start

CALLBACK_WITH_RETRIES = PUBLIC_URL + "/plivo/recording#rc=5&rp=all"
MEMBERS = [
    {
        "member_id": "17",
        "from": "14155550101",
        "to": "14155550100",
        "caller_name": "John",
        "direction": "inbound",
        "call_uuid": "acfbf0b5-12a4-4a3c-8d5e-000000000017",
        "join_time": "590",
    },
    {
        "member_id": "18",
        "from": "sip:bob@example.com",
        "to": "14155550100",
        "caller_name": "Bob",
        "direction": "outbound",
        "call_uuid": "acfbf0b5-12a4-4a3c-8d5e-000000000018",
        "join_time": "12",
    },
]
PARTICIPANT_FIELDS = ("member_id", "from", "to", "caller_name", "direction", "call_uuid")


def ms(iso: str) -> int:
    """Epoch milliseconds of an ISO-8601 UTC time."""
    return int(dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC).timestamp() * 1000)


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]


def mismatch(response: Any, status: int, code: str) -> tuple[int, Any] | None:
    """None when the response is the JSON error expected, else what came instead."""
    body = response.get_json(silent=True)
    if (
        response.status_code == status
        and isinstance(body, dict)
        and set(body) == {"error", "message"}
        and body["error"] == code
    ):
        return None
    return response.status_code, body


def count(app: Flask, model: Any) -> int:
    with services(app).sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def audit_events(app: Flask) -> list[AuditEvent]:
    with services(app).sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def audited_recordings(app: Flask, event: AuditEvent) -> list[str]:
    with services(app).sessions() as session:
        return sorted(
            session.scalars(
                select(AuditRecording.recording_id).where(AuditRecording.audit_id == event.id)
            )
        )


@dataclass
class Seed:
    """A recording to store as if its callback had arrived (with members if it was started)."""

    recording_id: str
    conference: str | None = "Room 1"
    start_ms: int = ms("2024-01-01T10:00:00")
    duration_ms: int | None = 60_000
    members: Sequence[dict[str, str]] = field(default_factory=tuple)
    status: str | None = None
    legal_hold: bool = False


def seed(app: Flask, *recordings: Seed) -> None:
    """Store recordings through the same functions the API and the callback use."""
    with transaction(services(app).sessions) as session:
        for r in recordings:
            if r.members:
                record_start(
                    session,
                    recording_id=r.recording_id,
                    conference_name=r.conference or "",
                    file_format="mp3",
                    api_id=None,
                    record_url=None,
                    members=list(r.members),
                    started_by="seed",
                )
            record_report(
                session,
                RecordingReport(
                    recording_id=r.recording_id,
                    record_url=f"https://media.plivo.com/v1/Recording/{r.recording_id}.mp3",
                    conference_name=r.conference,
                    duration_ms=r.duration_ms,
                    start_ms=r.start_ms,
                    end_ms=None if r.duration_ms is None else r.start_ms + r.duration_ms,
                ),
            )
            changes: dict[str, Any] = {}
            if r.status is not None:
                changes["status"] = r.status
            if r.status == Status.ARCHIVED:
                changes.update(
                    # As the worker names it, under an ARCHIVE_URL without a prefix.
                    archive_key=archive_key("", r.recording_id, r.start_ms, "mp3"),
                    archive_size=1234,
                    archive_sha256="ab" * 32,
                    archived_at=dt.datetime(2024, 1, 5, 12, 0, 0, tzinfo=dt.UTC),
                    attempts=1,
                )
            if r.legal_hold:
                changes["legal_hold"] = True
            if changes:
                session.execute(
                    update(Recording)
                    .where(Recording.recording_id == r.recording_id)
                    .values(**changes)
                )


def listed(response: Any) -> list[str]:
    assert response.status_code == 200, response.get_data(as_text=True)
    return [r["recording_id"] for r in response.json["recordings"]]


@pytest.fixture
def compliance(auth: Any) -> dict[str, str]:
    return auth(Role.COMPLIANCE, name="carol")


@pytest.fixture
def operator(auth: Any) -> dict[str, str]:
    return auth(Role.OPERATOR, name="olivia")


@pytest.fixture
def admin(auth: Any) -> dict[str, str]:
    return auth(Role.ADMIN, name="ada")


# --- tokens and roles -----------------------------------------------------------------------------


def test_request_without_authorization_header_is_401(client):
    assert_error(client.get("/api/recordings"), 401, "unauthorized")


def test_malformed_or_unknown_token_is_401(client):
    headers = ["Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "whk_sometoken", "Bearer whk_unknown"]
    wrong = {
        header: found
        for header in headers
        if (
            found := mismatch(
                client.get("/api/recordings", headers={"Authorization": header}),
                401,
                "unauthorized",
            )
        )
    }
    assert wrong == {}


def test_revoked_token_is_401(app, client):
    token = token_for(app, Role.COMPLIANCE, name="leaver")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/recordings", headers=headers).status_code == 200
    with transaction(services(app).sessions) as session:
        assert revoke_staff(session, "leaver")
    assert_error(client.get("/api/recordings", headers=headers), 401, "unauthorized")


def test_bearer_scheme_is_case_insensitive(app, client):
    token = token_for(app, Role.COMPLIANCE)
    response = client.get("/api/recordings", headers={"Authorization": f"bearer {token}"})
    assert response.status_code == 200


WRONG_ROLES = [
    (Role.COMPLIANCE, "POST", "/api/conferences/Room%201/recording"),
    (Role.COMPLIANCE, "DELETE", "/api/conferences/Room%201/recording"),
    (Role.COMPLIANCE, "GET", "/api/audit"),
    (Role.COMPLIANCE, "PUT", "/api/recordings/rec-1/legal-hold"),
    (Role.OPERATOR, "GET", "/api/recordings"),
    (Role.OPERATOR, "GET", "/api/recordings/rec-1"),
    (Role.OPERATOR, "GET", "/api/recordings/export"),
    (Role.OPERATOR, "GET", "/api/audit"),
]


def test_wrong_role_is_403_and_nothing_happens(app, client, plivo, auth):
    plivo.add_conference("Room 1")
    tokens = {role: auth(role) for role in (Role.COMPLIANCE, Role.OPERATOR)}
    wrong = {}
    for role, method, path in WRONG_ROLES:
        response = client.open(path, method=method, headers=tokens[role], json={"on": False})
        if found := mismatch(response, 403, "forbidden"):
            wrong[f"{role} {method} {path}"] = found
    assert wrong == {}
    assert plivo.calls == []
    assert count(app, Recording) == 0


def test_admin_may_use_every_endpoint(app, client, plivo, admin):
    plivo.add_conference("Room 1")
    started = client.post("/api/conferences/Room%201/recording", headers=admin)
    assert started.status_code == 201, started.json
    recording_id = started.json["recording_id"]
    assert client.delete("/api/conferences/Room%201/recording", headers=admin).status_code == 200
    assert listed(client.get("/api/recordings", headers=admin)) == [recording_id]
    assert client.get(f"/api/recordings/{recording_id}", headers=admin).status_code == 200
    assert client.get("/api/recordings/export", headers=admin).status_code == 200
    assert client.get("/api/audit", headers=admin).status_code == 200


# --- starting and stopping recordings -------------------------------------------------------------


def test_start_recording_answers_201_with_recording_id_and_participants(
    app, client, plivo, operator
):
    members = plivo.add_conference("Room 1", MEMBERS)
    response = client.post("/api/conferences/Room%201/recording", headers=operator)
    assert response.status_code == 201, response.json
    body = response.json
    assert body["recording_id"]
    assert body["conference_name"] == "Room 1"
    assert body["status"] == Status.RECORDING
    assert body["file_format"] == "mp3"
    assert body["started_by"] == "olivia"
    assert body["archive"] is None
    shown = [
        {name: p[name] for name in (*PARTICIPANT_FIELDS, "join_time")} for p in body["participants"]
    ]
    assert shown == [
        {name: m[name] for name in (*PARTICIPANT_FIELDS, "join_time")} for m in members
    ]
    assert body["participants"][0] == {
        "member_id": "17",
        "from": "14155550101",
        "to": "14155550100",
        "caller_name": "John",
        "direction": "inbound",
        "call_uuid": "acfbf0b5-12a4-4a3c-8d5e-000000000017",
        "join_time": "590",
        "joined_at": body["participants"][0]["joined_at"],
        "left_at": None,
        "source": "snapshot",
        "notified_at": None,
    }
    # Snapshotted at the start: joined join_time seconds before it.
    for participant, member in zip(body["participants"], members, strict=True):
        joined = dt.datetime.fromisoformat(participant["joined_at"]).timestamp() * 1000
        expected = body["start_ms"] - int(member["join_time"]) * 1000
        assert abs(joined - expected) < 1500, (participant, body["start_ms"])
    with services(app).sessions() as session:
        recording = session.scalars(select(Recording)).one()
        participants = session.scalar(select(func.count()).select_from(Participant))
    assert recording.recording_id == body["recording_id"]
    assert recording.status == Status.RECORDING
    assert recording.started_by == "olivia"
    assert recording.record_url == plivo.media_url(body["recording_id"])
    assert participants == 2


def test_start_recording_asks_plivo_to_call_back_with_retries(client, plivo, operator):
    plivo.add_conference("Room 1")
    response = client.post("/api/conferences/Room%201/recording", headers=operator)
    assert response.status_code == 201
    records = [c for c in plivo.calls if c[0] == "POST" and c[1].endswith("/Record/")]
    assert len(records) == 1
    _, path, payload = records[0]
    assert path == f"/v1/Account/{plivo.auth_id}/Conference/Room 1/Record/"
    assert payload["callback_url"] == CALLBACK_WITH_RETRIES
    assert payload["callback_method"] == "POST"
    assert payload["file_format"] == "mp3"
    assert plivo.recordings[response.json["recording_id"]]["callback_url"] == (
        CALLBACK_WITH_RETRIES
    )


def test_start_recording_honours_file_format(app, client, plivo, operator):
    plivo.add_conference("Room 1")
    response = client.post(
        "/api/conferences/Room%201/recording", headers=operator, json={"file_format": "wav"}
    )
    assert response.status_code == 201, response.json
    assert response.json["file_format"] == "wav"
    (record,) = [c for c in plivo.calls if c[0] == "POST"]
    assert record[2]["file_format"] == "wav"
    with services(app).sessions() as session:
        recording = session.scalars(select(Recording)).one()
    assert recording.file_format == "wav"


def test_bad_file_format_is_400_and_plivo_is_not_called(app, client, plivo, operator):
    plivo.add_conference("Room 1")
    wrong = {}
    for file_format in ("ogg", "MP3", None, 3, ""):
        response = client.post(
            "/api/conferences/Room%201/recording",
            headers=operator,
            json={"file_format": file_format},
        )
        if found := mismatch(response, 400, "invalid_file_format"):
            wrong[repr(file_format)] = found
    assert wrong == {}
    assert plivo.calls == []
    assert count(app, Recording) == 0


def test_start_body_that_is_not_a_json_object_is_400(client, plivo, operator):
    plivo.add_conference("Room 1")
    response = client.post("/api/conferences/Room%201/recording", headers=operator, json=["wav"])
    assert_error(response, 400, "invalid_body")
    assert plivo.calls == []


def test_start_on_conference_not_running_is_404(app, client, plivo, operator):
    response = client.post("/api/conferences/Nobody%20Here/recording", headers=operator)
    assert_error(response, 404, "conference_not_found")
    assert [c[0] for c in plivo.calls] == ["GET"]
    assert count(app, Recording) == 0


def test_start_with_conference_name_holding_a_slash(client, plivo, operator):
    plivo.add_conference("Sales/EMEA")
    response = client.post("/api/conferences/Sales%2FEMEA/recording", headers=operator)
    assert response.status_code == 201, response.json
    assert response.json["conference_name"] == "Sales/EMEA"


def test_plivo_refusing_credentials_is_502_plivo_auth(make_app, plivo):
    app = make_app(PLIVO_AUTH_TOKEN="wrong-token")
    plivo.add_conference("Room 1")
    headers = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}
    response = app.test_client().post("/api/conferences/Room%201/recording", headers=headers)
    assert_error(response, 502, "plivo_auth")
    assert count(app, Recording) == 0
    assert not any(c[0] == "POST" for c in plivo.calls)


def test_plivo_failing_is_502_and_nothing_stored(app, client, plivo, operator):
    plivo.add_conference("Room 1")
    plivo.api_faults = [500, 500, 500]  # the conference read, and both of its retries
    response = client.post("/api/conferences/Room%201/recording", headers=operator)
    assert_error(response, 502, "plivo_error")
    assert count(app, Recording) == 0
    assert [c[0] for c in plivo.calls] == ["GET", "GET", "GET"]


def test_start_without_public_url_is_503(make_app, plivo):
    app = make_app(PUBLIC_URL="")
    plivo.add_conference("Room 1")
    headers = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}
    response = app.test_client().post("/api/conferences/Room%201/recording", headers=headers)
    assert_error(response, 503, "public_url_not_set")
    assert plivo.calls == []


def test_stop_recording_answers_200_and_plivo_sees_delete(client, plivo, operator):
    plivo.add_conference("Room 1")
    started = client.post("/api/conferences/Room%201/recording", headers=operator)
    recording_id = started.json["recording_id"]
    response = client.delete("/api/conferences/Room%201/recording", headers=operator)
    assert response.status_code == 200, response.json
    assert response.json["conference_name"] == "Room 1"
    method, path, _ = plivo.calls[-1]
    assert (method, path) == ("DELETE", f"/v1/Account/{plivo.auth_id}/Conference/Room 1/Record/")
    assert plivo.recordings[recording_id]["state"] == "stopped"


def test_stop_on_conference_not_running_is_404(client, plivo, operator):
    response = client.delete("/api/conferences/Gone/recording", headers=operator)
    assert response.status_code == 404
    assert set(response.json) == {"error", "message"}


def test_stop_when_plivo_fails_is_502(client, plivo, operator):
    plivo.add_conference("Room 1")
    plivo.api_faults = [500]
    response = client.delete("/api/conferences/Room%201/recording", headers=operator)
    assert_error(response, 502, "plivo_error")
    assert [c[0] for c in plivo.calls] == ["DELETE"]


# --- finding recordings ---------------------------------------------------------------------------

CATALOG = (
    Seed(
        "r-a",
        "Room 1",
        ms("2024-01-01T10:00:00"),
        60_000,
        members=[{"member_id": "1", "from": "14155550101", "to": "14155550100"}],
    ),
    Seed(
        "r-b",
        "Room 10",
        ms("2024-01-02T10:00:00"),
        300_000,
        members=[{"member_id": "1", "from": "sip:bob@example.com", "to": "+1 415 555 0199"}],
        status=Status.ARCHIVED,
    ),
    Seed("r-c", "Lobby", ms("2024-01-03T10:00:00"), 30_000, status=Status.FAILED, legal_hold=True),
    Seed("r-d", "Room 1", ms("2024-01-04T10:00:00"), 3_600_000),
    Seed("r-e", "Room_1x", ms("2024-01-05T10:00:00"), 120_000, status=Status.ARCHIVED),
)

FILTER_CASES = [
    ({}, ["r-e", "r-d", "r-c", "r-b", "r-a"]),
    ({"conference": "Room 1"}, ["r-d", "r-a"]),
    ({"conference": "room 1"}, []),
    ({"conference_prefix": "Room 1"}, ["r-d", "r-b", "r-a"]),
    ({"conference_prefix": "Room_"}, ["r-e"]),
    ({"conference_prefix": "Room%"}, []),
    ({"participant": "+1 (415) 555-0101"}, ["r-a"]),
    ({"participant": "14155550101"}, ["r-a"]),
    ({"participant": "sip:Bob@Example.com"}, ["r-b"]),
    ({"participant": "bob@example.com"}, ["r-b"]),
    ({"participant": "415-555-0199"}, []),
    ({"participant": "1-415-555-0199"}, ["r-b"]),
    ({"participant": "+14155550100"}, ["r-a"]),
    ({"participant": "+19995550000"}, []),
    ({"since": "2024-01-03"}, ["r-e", "r-d", "r-c"]),
    ({"since": "2024-01-02T10:00:00Z"}, ["r-e", "r-d", "r-c", "r-b"]),
    ({"since": "2024-01-02T12:00:00+02:00"}, ["r-e", "r-d", "r-c", "r-b"]),
    ({"since": "2024-01-02T10:00:00.001Z"}, ["r-e", "r-d", "r-c"]),
    ({"until": "2024-01-02T10:00:00Z"}, ["r-a"]),
    ({"until": "2024-01-03"}, ["r-b", "r-a"]),
    ({"since": "2024-01-02", "until": "2024-01-04"}, ["r-c", "r-b"]),
    ({"status": "archived"}, ["r-e", "r-b"]),
    ({"status": "failed"}, ["r-c"]),
    ({"status": "pending"}, ["r-d", "r-a"]),
    ({"status": "recording"}, []),
    ({"min_duration": "300"}, ["r-d", "r-b"]),
    ({"min_duration": "300.5"}, ["r-d"]),
    ({"max_duration": "60"}, ["r-c", "r-a"]),
    ({"min_duration": "60", "max_duration": "300"}, ["r-e", "r-b", "r-a"]),
    ({"legal_hold": "true"}, ["r-c"]),
    ({"legal_hold": "false"}, ["r-e", "r-d", "r-b", "r-a"]),
    ({"conference_prefix": "Room", "status": "pending", "min_duration": "120"}, ["r-d"]),
]


@pytest.fixture
def catalog(app: Flask) -> None:
    seed(app, *CATALOG)


def test_each_filter_finds_exactly_its_recordings_newest_first(client, catalog, compliance):
    # One catalog for every case; a failure lists every filter that answered wrongly.
    wrong = {}
    for query, expected in FILTER_CASES:
        found = listed(client.get("/api/recordings", query_string=query, headers=compliance))
        if found != expected:
            wrong[json.dumps(query)] = {"expected": expected, "found": found}
    assert wrong == {}


def test_listed_recording_shows_the_contract_fields(client, catalog, compliance):
    response = client.get(
        "/api/recordings", query_string={"conference": "Room 10"}, headers=compliance
    )
    (recording,) = response.json["recordings"]
    assert response.json["next_cursor"] is None
    assert recording["recording_id"] == "r-b"
    assert recording["conference_name"] == "Room 10"
    assert recording["status"] == "archived"
    assert recording["file_format"] == "mp3"
    assert recording["duration_ms"] == 300_000
    assert recording["start_ms"] == ms("2024-01-02T10:00:00")
    assert recording["end_ms"] == ms("2024-01-02T10:05:00")
    assert recording["participants"][0]["from"] == "sip:bob@example.com"
    assert recording["archive"] == {
        "key": "recordings/2024/01/02/r-b.mp3",
        "size": 1234,
        "sha256": "ab" * 32,
        "version_id": None,
        "archived_at": "2024-01-05T12:00:00Z",
    }
    assert recording["attempts"] == 1
    assert recording["last_error"] is None


def _many(n: int, prefix: str = "m", conference: str = "Bulk", start: int = 0) -> list[Seed]:
    base = ms("2024-03-01T00:00:00")
    return [Seed(f"{prefix}-{i:04d}", conference, base + (start + i) * 1000) for i in range(n)]


def test_limit_defaults_to_50_and_allows_at_most_200(app, client, compliance):
    seed(app, *_many(201))
    first = client.get("/api/recordings", headers=compliance)
    assert len(listed(first)) == 50
    assert listed(first)[0] == "m-0200"
    assert first.json["next_cursor"]
    biggest = client.get("/api/recordings", query_string={"limit": 200}, headers=compliance)
    assert listed(biggest) == [f"m-{i:04d}" for i in range(200, 0, -1)]
    rest = client.get(
        "/api/recordings",
        query_string={"limit": 200, "cursor": biggest.json["next_cursor"]},
        headers=compliance,
    )
    assert listed(rest) == ["m-0000"]
    assert rest.json["next_cursor"] is None


def test_page_that_ends_exactly_at_the_last_row_has_no_next_cursor(app, client, compliance):
    seed(app, *_many(4))
    response = client.get("/api/recordings", query_string={"limit": 4}, headers=compliance)
    assert len(listed(response)) == 4
    assert response.json["next_cursor"] is None


def test_cursor_walks_every_page_without_skipping_or_repeating_rows(app, client, compliance):
    # Three recordings share each start time, so the cursor must break ties on the row id.
    base = ms("2024-03-01T00:00:00")
    originals = [Seed(f"o-{i:02d}", "Walk", base + (i // 3) * 1000) for i in range(30)]
    seed(app, *originals)
    seen: list[str] = []
    starts: list[int] = []
    olders: list[str] = []
    cursor = None
    for page in range(100):
        query = {"limit": 4, "conference": "Walk"} | ({"cursor": cursor} if cursor else {})
        response = client.get("/api/recordings", query_string=query, headers=compliance)
        rows = response.json["recordings"]
        seen += [r["recording_id"] for r in rows]
        starts += [r["start_ms"] for r in rows]
        cursor = response.json["next_cursor"]
        if cursor is None:
            break
        # Between pages, new recordings arrive: newer than all, tied with the page's last row,
        # and older than all. Only the older ones lie ahead of the cursor.
        older = Seed(f"x-old-{page:02d}", "Walk", base - (page + 1) * 1000)
        olders.append(older.recording_id)
        seed(
            app,
            Seed(f"x-new-{page:02d}", "Walk", base + 10**6 + page),
            Seed(f"x-tie-{page:02d}", "Walk", rows[-1]["start_ms"]),
            older,
        )
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert seen == [f"o-{i:02d}" for i in range(29, -1, -1)] + olders
    assert starts == sorted(starts, reverse=True)


def test_cursor_keeps_the_filters_of_each_request(app, client, compliance):
    seed(app, *_many(6, "a", "Alpha"), *_many(6, "b", "Beta", start=100))
    first = client.get(
        "/api/recordings", query_string={"conference": "Alpha", "limit": 4}, headers=compliance
    )
    second = client.get(
        "/api/recordings",
        query_string={"conference": "Alpha", "limit": 4, "cursor": first.json["next_cursor"]},
        headers=compliance,
    )
    assert listed(first) + listed(second) == [f"a-{i:04d}" for i in range(5, -1, -1)]


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_PARAMETERS = [
    ({"since": "yesterday"}, "since"),
    ({"since": "2024-13-01"}, "since"),
    ({"until": "not a date"}, "until"),
    ({"since": "2024-02-01", "until": "2024-01-01"}, "until"),
    ({"limit": "0"}, "limit"),
    ({"limit": "201"}, "limit"),
    ({"limit": "10000"}, "limit"),
    ({"limit": "abc"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "1.5"}, "limit"),
    ({"cursor": "garbage"}, "cursor"),
    ({"cursor": "!!!"}, "cursor"),
    ({"cursor": _cursor("abc:def")}, "cursor"),
    ({"cursor": _cursor("99999999999999999999999999:1")}, "cursor"),
    ({"cursor": _cursor("1700000000000:99999999999999999999999999")}, "cursor"),
    ({"status": "done"}, "status"),
    ({"status": "ARCHIVED"}, "status"),
    ({"min_duration": "abc"}, "min_duration"),
    ({"min_duration": "-1"}, "min_duration"),
    ({"min_duration": "nan"}, "min_duration"),
    ({"min_duration": "inf"}, "min_duration"),
    ({"max_duration": "ten"}, "max_duration"),
    ({"legal_hold": "yes"}, "legal_hold"),
    ({"conference": "c" * 256}, "conference"),
]


@pytest.mark.parametrize("path", ["/api/recordings", "/api/recordings/export"])
def test_each_bad_parameter_is_400_naming_it(client, compliance, path):
    wrong = {}
    for query, name in BAD_PARAMETERS:
        if path.endswith("export") and name in ("limit", "cursor"):
            continue  # the export takes every matching row: no pages
        response = client.get(path, query_string=query, headers=compliance)
        if found := mismatch(response, 400, f"invalid_{name}"):
            wrong[json.dumps(query)] = found
    assert wrong == {}


# --- one recording --------------------------------------------------------------------------------


def test_pending_recording_shows_participants_and_no_archive(app, client, compliance):
    seed(app, Seed("r-one", "Room 1", members=MEMBERS))
    response = client.get("/api/recordings/r-one", headers=compliance)
    assert response.status_code == 200, response.json
    body = response.json
    assert body["recording_id"] == "r-one"
    assert body["status"] == "pending"
    assert body["archive"] is None
    assert body["last_error"] is None
    assert body["attempts"] == 0
    assert [p["from"] for p in body["participants"]] == ["14155550101", "sip:bob@example.com"]
    assert {name: body["participants"][1][name] for name in (*PARTICIPANT_FIELDS, "join_time")} == {
        name: MEMBERS[1][name] for name in (*PARTICIPANT_FIELDS, "join_time")
    }
    assert body["participants"][1]["source"] == "snapshot"


def test_recording_reported_by_callback_is_shown(app, client, plivo, compliance):
    params = plivo.finish_recording("cb-rec", b"audio", duration_ms=42_000, conference_name="CB")
    assert post_callback(client, plivo, params).status_code == 200
    body = client.get("/api/recordings/cb-rec", headers=compliance).json
    assert body["conference_name"] == "CB"
    assert body["duration_ms"] == 42_000
    assert body["status"] == "pending"
    assert body["participants"] == []


def test_unknown_recording_is_404(client, compliance):
    assert_error(client.get("/api/recordings/nope", headers=compliance), 404, "recording_not_found")


def test_audio_of_recording_not_archived_is_409(app, client, compliance):
    waiting = (Status.RECORDING, Status.PENDING, Status.ARCHIVING, Status.FAILED)
    seed(app, *(Seed(f"r-{status}", status=status) for status in waiting))
    wrong = {
        status: found
        for status in waiting
        if (
            found := mismatch(
                client.get(f"/api/recordings/r-{status}/audio", headers=compliance),
                409,
                "not_archived",
            )
        )
    }
    assert wrong == {}


def test_audio_of_unknown_recording_is_404(client, compliance):
    response = client.get("/api/recordings/nope/audio", headers=compliance)
    assert_error(response, 404, "recording_not_found")


# --- export ---------------------------------------------------------------------------------------


@pytest.fixture
def export_catalog(app: Flask) -> list[str]:
    """120 recordings, 75 of them in conference "Export A" (the ids answered newest first)."""
    wanted = [
        Seed(f"xa-{i:03d}", "Export A", ms("2024-02-01T00:00:00") + i * 60_000) for i in range(75)
    ]
    for s in wanted[:3]:
        s.members = [{"member_id": "1", "from": "14155550101", "to": "14155550100"}]
    others = [
        Seed(f"xb-{i:03d}", "Export B", ms("2024-02-01T00:00:30") + i * 60_000) for i in range(45)
    ]
    seed(app, *wanted, *others)
    return [s.recording_id for s in reversed(wanted)]


def test_export_ndjson_streams_every_matching_row(client, compliance, export_catalog):
    response = client.get(
        "/api/recordings/export",
        query_string={"format": "ndjson", "conference": "Export A"},
        headers=compliance,
    )
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    assert "recordings.ndjson" in response.headers["Content-Disposition"]
    rows = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert [r["recording_id"] for r in rows] == export_catalog
    assert {r["conference_name"] for r in rows} == {"Export A"}
    assert rows[-1]["participants"][0]["from"] == "14155550101"
    # Not archived yet: like the API's `"archive": null`, no archive fields.
    assert rows[0]["status"] == "pending"
    assert (rows[0]["archive_key"], rows[0]["archive_sha256"]) == (None, None)


def test_export_defaults_to_ndjson_and_ignores_page_size(client, compliance, export_catalog):
    response = client.get("/api/recordings/export", query_string={"limit": "5"}, headers=compliance)
    assert response.mimetype == "application/x-ndjson"
    assert len(response.get_data(as_text=True).splitlines()) == 120


def test_export_csv_streams_every_matching_row(client, compliance, export_catalog):
    response = client.get(
        "/api/recordings/export",
        query_string={"format": "csv", "conference": "Export A"},
        headers=compliance,
    )
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    reader = csv.DictReader(io.StringIO(response.get_data(as_text=True)))
    rows = list(reader)
    assert reader.fieldnames[:3] == ["recording_id", "conference_name", "status"]
    assert [r["recording_id"] for r in rows] == export_catalog
    assert rows[-1]["participants"] == "14155550101>14155550100"
    assert rows[0]["participants"] == ""
    assert rows[0]["duration_ms"] == "60000"


def test_export_of_nothing_is_header_only_csv(client, compliance):
    response = client.get(
        "/api/recordings/export", query_string={"format": "csv"}, headers=compliance
    )
    assert response.status_code == 200
    assert response.get_data(as_text=True).splitlines()[0].startswith("recording_id,")
    assert len(response.get_data(as_text=True).splitlines()) == 1


def test_export_with_bad_format_is_400(client, compliance):
    wrong = {
        fmt: found
        for fmt in ("xml", "CSV", "json", "")
        if (
            found := mismatch(
                client.get(
                    "/api/recordings/export", query_string={"format": fmt}, headers=compliance
                ),
                400,
                "invalid_format",
            )
        )
    }
    assert wrong == {}


# --- the audit log --------------------------------------------------------------------------------


def test_every_api_request_is_audited_whatever_its_outcome(app, client, auth):
    seed(app, Seed("r-aud"))
    carol = auth(Role.COMPLIANCE, name="carol")
    olivia = auth(Role.OPERATOR, name="olivia")
    env = {"REMOTE_ADDR": "198.51.100.23"}
    answers = [
        client.get("/api/recordings", environ_base=env),
        client.get("/api/recordings", headers={"Authorization": "Bearer nope"}, environ_base=env),
        client.get("/api/recordings", headers=olivia, environ_base=env),
        client.get("/api/recordings/missing", headers=carol, environ_base=env),
        client.get(
            "/api/recordings",
            query_string={"status": "pending"},
            headers={**carol, "User-Agent": "audit-test/1"},
            environ_base=env,
        ),
    ]
    assert [a.status_code for a in answers] == [401, 401, 403, 404, 200]
    events = audit_events(app)
    assert [
        (e.staff_name, e.role, e.method, e.path, e.query, e.status, e.remote_addr) for e in events
    ] == [
        ("olivia", "operator", "GET", "/api/recordings", "", 403, "198.51.100.23"),
        ("carol", "compliance", "GET", "/api/recordings/missing", "", 404, "198.51.100.23"),
        ("carol", "compliance", "GET", "/api/recordings", "status=pending", 200, "198.51.100.23"),
    ]
    assert events[-1].user_agent == "audit-test/1"
    assert all(e.at is not None and e.request_id for e in events)
    assert events[-1].request_id == answers[-1].headers["X-Request-ID"]
    # The two without a valid token served nothing: they are counted, not kept one by one.
    with services(app).sessions() as session:
        tally = session.scalars(select(AuditAnonymous)).one()
    assert (tally.remote_addr, tally.method, tally.path, tally.status, tally.count) == (
        "198.51.100.23",
        "GET",
        "/api/recordings",
        401,
        2,
    )


def test_writes_are_audited_too(app, client, plivo, operator):
    plivo.add_conference("Room 1")
    started = client.post("/api/conferences/Room%201/recording", headers=operator)
    client.delete("/api/conferences/Room%201/recording", headers=operator)
    events = audit_events(app)
    assert [(e.method, e.path, e.status, e.staff_name) for e in events] == [
        ("POST", "/api/conferences/Room 1/recording", 201, "olivia"),
        ("DELETE", "/api/conferences/Room 1/recording", 200, "olivia"),
    ]
    assert audited_recordings(app, events[0]) == [started.json["recording_id"]]


def test_unknown_api_path_and_wrong_method_are_audited(app, client, compliance):
    assert_error(client.get("/api/nothing-here", headers=compliance), 404, "not_found")
    assert_error(client.delete("/api/recordings", headers=compliance), 405, "method_not_allowed")
    events = audit_events(app)
    assert [(e.method, e.path, e.status) for e in events] == [
        ("GET", "/api/nothing-here", 404),
        ("DELETE", "/api/recordings", 405),
    ]


def test_callbacks_and_openapi_are_not_in_the_staff_audit_log(app, client, plivo):
    params = plivo.finish_recording("not-audited", b"audio")
    assert post_callback(client, plivo, params).status_code == 200
    client.get("/openapi.json")
    assert audit_events(app) == []


def test_list_and_detail_record_which_recordings_they_showed(app, client, compliance):
    seed(app, *CATALOG)
    client.get("/api/recordings", query_string={"conference": "Room 1"}, headers=compliance)
    client.get("/api/recordings/r-c", headers=compliance)
    client.get("/api/recordings/missing", headers=compliance)
    client.get("/api/recordings", query_string={"conference": "Nowhere"}, headers=compliance)
    client.get("/api/recordings", query_string={"limit": "2"}, headers=compliance)
    events = audit_events(app)
    assert [audited_recordings(app, e) for e in events] == [
        ["r-a", "r-d"],
        ["r-c"],
        ["missing"],
        [],
        ["r-d", "r-e"],
    ]


def test_audit_log_is_admin_only(client, compliance, operator):
    assert_error(client.get("/api/audit", headers=compliance), 403, "forbidden")
    assert_error(client.get("/api/audit", headers=operator), 403, "forbidden")


def test_audit_log_lists_events_newest_first_with_their_recordings(app, client, compliance, admin):
    seed(app, *CATALOG)
    client.get("/api/recordings/r-b", headers=compliance)
    client.get("/api/recordings", query_string={"status": "failed"}, headers=compliance)
    response = client.get("/api/audit", headers=admin)
    assert response.status_code == 200
    events = response.json["events"]
    assert response.json["next_cursor"] is None
    assert [(e["staff"], e["path"], e["query"], e["recording_ids"]) for e in events] == [
        ("carol", "/api/recordings", "status=failed", ["r-c"]),
        ("carol", "/api/recordings/r-b", "", ["r-b"]),
    ]
    assert events[0]["role"] == "compliance"
    assert events[0]["status"] == 200
    assert events[0]["method"] == "GET"
    assert events[0]["remote_addr"] == "127.0.0.1"
    assert events[0]["at"].endswith("Z")


def test_audit_log_filters_by_staff_and_recording(app, client, auth, admin):
    seed(app, *CATALOG)
    alice = auth(Role.COMPLIANCE, name="alice")
    bob = auth(Role.COMPLIANCE, name="bob")
    client.get("/api/recordings/r-a", headers=alice)
    client.get("/api/recordings", query_string={"conference": "Room 10"}, headers=bob)
    client.get("/api/recordings/r-c", headers=bob)

    def paths(**query: str) -> list[tuple[str, str]]:
        response = client.get("/api/audit", query_string=query, headers=admin)
        assert response.status_code == 200, response.json
        return [(e["staff"], e["path"]) for e in response.json["events"]]

    assert paths(staff="alice") == [("alice", "/api/recordings/r-a")]
    assert paths(staff="bob") == [("bob", "/api/recordings/r-c"), ("bob", "/api/recordings")]
    assert paths(staff="nobody") == []
    assert paths(recording_id="r-b") == [("bob", "/api/recordings")]
    assert paths(recording_id="r-a") == [("alice", "/api/recordings/r-a")]
    assert paths(recording_id="r-c", staff="alice") == []


def test_audit_log_filters_by_time(app, client, auth, admin):
    alice = auth(Role.COMPLIANCE, name="alice")
    bob = auth(Role.COMPLIANCE, name="bob")
    client.get("/api/recordings", headers=alice)
    time.sleep(0.01)
    middle = utcnow()
    time.sleep(0.01)
    client.get("/api/recordings", headers=bob)

    def staff(**query: str) -> list[str | None]:
        response = client.get("/api/audit", query_string=query, headers=admin)
        assert response.status_code == 200, response.json
        return [e["staff"] for e in response.json["events"] if e["path"] != "/api/audit"]

    at = middle.isoformat()
    assert staff(since=at) == ["bob"]
    assert staff(until=at) == ["alice"]
    assert staff(since=(middle - dt.timedelta(hours=1)).isoformat()) == ["bob", "alice"]
    assert staff(since=(middle + dt.timedelta(hours=1)).isoformat()) == []
    assert staff(until="2000-01-01") == []


AUDIT_BAD_PARAMETERS = [
    ({"since": "soon"}, "since"),
    ({"until": "2024-02-30"}, "until"),
    ({"limit": "0"}, "limit"),
    ({"limit": "201"}, "limit"),
    ({"cursor": "garbage"}, "cursor"),
    ({"cursor": _cursor("1:99999999999999999999999999")}, "cursor"),
    ({"cursor": _cursor("99999999999999999999999999:1")}, "cursor"),
]


def test_audit_log_bad_parameter_is_400_naming_it(client, admin):
    wrong = {}
    for query, name in AUDIT_BAD_PARAMETERS:
        response = client.get("/api/audit", query_string=query, headers=admin)
        if found := mismatch(response, 400, f"invalid_{name}"):
            wrong[json.dumps(query)] = found
    assert wrong == {}


def test_audit_log_cursor_walks_every_event_once(app, client, compliance, admin):
    for i in range(7):
        client.get("/api/recordings", query_string={"conference": f"c{i}"}, headers=compliance)
    before = [e.id for e in audit_events(app)]
    seen: list[int] = []
    cursor = None
    for _ in range(20):
        query = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        response = client.get("/api/audit", query_string=query, headers=admin)
        assert response.status_code == 200, response.json
        # Each page read is itself audited, newer than the cursor: it must not show up later.
        seen += [e["id"] for e in response.json["events"]]
        cursor = response.json["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(before, reverse=True)


def test_audit_log_refuses_update_and_delete(app, client, compliance):
    seed(app, Seed("r-1"))
    client.get("/api/recordings/r-1", headers=compliance)
    statements = [
        update(AuditEvent).values(staff_name="someone-else"),
        update(AuditEvent).values(status=500),
        delete(AuditEvent),
        update(AuditRecording).values(recording_id="forged"),
        delete(AuditRecording),
    ]
    for statement in statements:
        with (
            pytest.raises(DBAPIError, match="append-only"),
            transaction(services(app).sessions) as session,
        ):
            session.execute(statement)
    (event,) = audit_events(app)
    assert (event.staff_name, event.status) == ("carol", 200)
    assert audited_recordings(app, event) == ["r-1"]


def test_audit_event_cannot_be_changed_through_the_orm(app, client, compliance):
    client.get("/api/recordings", headers=compliance)
    with (
        pytest.raises(DBAPIError, match="append-only"),
        transaction(services(app).sessions) as session,
    ):
        event = session.scalars(select(AuditEvent)).one()
        event.status = 200 if event.status != 200 else 500
        session.flush()
    with pytest.raises(DBAPIError, match="append-only"), transaction(services(app).sessions) as s:
        s.delete(s.scalars(select(AuditEvent)).one())
        s.flush()
    assert len(audit_events(app)) == 1


# --- error shape and routing ----------------------------------------------------------------------


def test_unknown_path_is_404_json(client):
    assert_error(client.get("/no/such/path"), 404, "not_found")


def test_wrong_method_is_405_json_with_allow(client, compliance):
    response = client.post("/api/recordings", headers=compliance)
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


def test_an_unmigrated_database_is_503_saying_run_db_upgrade(make_app, tmp_path) -> None:
    app = make_app(database=f"sqlite:///{tmp_path}/never-migrated.sqlite3")
    response = app.test_client().get(
        "/api/recordings", headers={"Authorization": "Bearer whk_anything"}
    )
    assert_error(response, 503, "database_not_migrated")
    assert "run `webhook db upgrade`" in response.json["message"]
