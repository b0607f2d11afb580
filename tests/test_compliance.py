"""Retention and legal hold end to end: S3 Object Lock on moto's server, through the API and CLI.

moto's server answers GetObjectRetention with a 500, so retention is read from HeadObject
(`ObjectLockMode`, `ObjectLockRetainUntilDate`), as tests/test_storage.py does.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import DatabaseError

from tests.conftest import AppFactory, make_bucket, mp3_bytes, post_callback, token_for
from tests.fakeplivo import FakePlivo
from tests.test_cli import worker_command_isolated  # noqa: F401 - a fixture, named in usefixtures
from webhook import services
from webhook.archive.worker import Worker
from webhook.cli import cli
from webhook.models import Base, Recording, Role, Status

RETENTION_DAYS = 30
LOCKED = {"RETENTION_DAYS": str(RETENTION_DAYS), "OBJECT_LOCK_MODE": "GOVERNANCE"}
# Recording ends on whole seconds: boto3 sends x-amz-object-lock-retain-until-date to the second.
DAY_MS = 86_400_000
NOW_MS = int(dt.datetime.now(dt.UTC).timestamp()) * 1000


@pytest.fixture
def locked_bucket(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint, object_lock=True)


@pytest.fixture
def locked_app(make_app: AppFactory, locked_bucket: str) -> Flask:
    """Retention asked for (30 days, GOVERNANCE) on a bucket created with Object Lock."""
    return make_app(f"s3://{locked_bucket}/p", **LOCKED)


def headers(app: Flask, role: Role = Role.ADMIN, name: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(app, role, name)}"}


def queue(app: Flask, plivo: FakePlivo, recording_id: str, end_ms: int = NOW_MS) -> None:
    """Finish a recording that ended at `end_ms` and deliver its signed callback."""
    params = plivo.finish_recording(recording_id, mp3_bytes(2000))
    duration_ms = int(float(params["recording_duration_ms"]))
    params["recording_end_ms"] = str(end_ms)
    params["recording_start_ms"] = str(end_ms - duration_ms)
    response = post_callback(app.test_client(), plivo, params)
    assert response.status_code == 200, response.get_json()


def archive(app: Flask, plivo: FakePlivo, *ends: tuple[str, int]) -> None:
    """Queue recordings (id, end in epoch ms) and let the worker archive them all."""
    for recording_id, end_ms in ends:
        queue(app, plivo, recording_id, end_ms)
    assert Worker(services(app)).run(once=True) == len(ends)


def row(app: Flask, recording_id: str) -> Recording:
    with services(app).sessions() as session:
        return session.scalars(
            select(Recording).where(Recording.recording_id == recording_id)
        ).one()


def instant(epoch_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def retained_until(end_ms: int) -> dt.datetime:
    return instant(end_ms) + dt.timedelta(days=RETENTION_DAYS)


def get_recording(app: Flask, recording_id: str) -> dict[str, Any]:
    response = app.test_client().get(
        f"/api/recordings/{recording_id}", headers=headers(app, Role.COMPLIANCE)
    )
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def listed(app: Flask, **query: str) -> list[str]:
    response = app.test_client().get(
        "/api/recordings", query_string=query, headers=headers(app, Role.COMPLIANCE)
    )
    assert response.status_code == 200, response.get_json()
    return [r["recording_id"] for r in response.get_json()["recordings"]]


def exported(app: Flask, **query: str) -> list[str]:
    response = app.test_client().get(
        "/api/recordings/export", query_string=query, headers=headers(app, Role.COMPLIANCE)
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return [
        json.loads(line)["recording_id"] for line in response.get_data(as_text=True).splitlines()
    ]


def put_hold(app: Flask, recording_id: str, body: Any, role: Role = Role.ADMIN) -> Any:
    return app.test_client().put(
        f"/api/recordings/{recording_id}/legal-hold", json=body, headers=headers(app, role)
    )


def s3_hold(s3: Any, bucket: str, key: str, version_id: str) -> str | None:
    """The legal hold status of one object version as S3 reports it (None: never set)."""
    head = s3.head_object(Bucket=bucket, Key=key, VersionId=version_id)
    return head.get("ObjectLockLegalHoldStatus")


# --- retention on the stored object -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
def test_archived_object_is_locked_until_recording_end_plus_retention_days(
    make_app: AppFactory, plivo: FakePlivo, s3: Any, locked_bucket: str, mode: str
) -> None:
    app = make_app(f"s3://{locked_bucket}/p", **{**LOCKED, "OBJECT_LOCK_MODE": mode})
    # Ended ten days ago: the retention counts from the recording's end, not from archiving.
    end_ms = NOW_MS - 10 * DAY_MS
    archive(app, plivo, ("ret-1", end_ms))

    body = get_recording(app, "ret-1")
    assert body["status"] == Status.ARCHIVED
    assert body["end_ms"] == end_ms
    key, version_id = body["archive"]["key"], body["archive"]["version_id"]
    assert version_id
    head = s3.head_object(Bucket=locked_bucket, Key=key, VersionId=version_id)
    assert head["ObjectLockMode"] == mode
    assert head["ObjectLockRetainUntilDate"] == retained_until(end_ms)
    assert body["retain_until"] == iso(retained_until(end_ms))
    assert row(app, "ret-1").retain_until == retained_until(end_ms)


def test_without_retention_days_the_object_has_no_lock_and_retain_until_is_null(
    make_app: AppFactory, plivo: FakePlivo, s3: Any, locked_bucket: str
) -> None:
    # Even in a bucket that can lock, nothing is locked when retention is not configured.
    app = make_app(f"s3://{locked_bucket}/p")
    archive(app, plivo, ("plain-1", NOW_MS))

    body = get_recording(app, "plain-1")
    assert body["status"] == Status.ARCHIVED
    assert body["retain_until"] is None
    head = s3.head_object(
        Bucket=locked_bucket, Key=body["archive"]["key"], VersionId=body["archive"]["version_id"]
    )
    assert "ObjectLockMode" not in head
    assert "ObjectLockRetainUntilDate" not in head
    assert listed(app, retained_until_after="2000-01-01") == []
    assert listed(app) == ["plain-1"]


# --- refusal to run without Object Lock ---------------------------------------------------------


@pytest.mark.usefixtures("worker_command_isolated")
def test_worker_refuses_to_start_when_the_bucket_has_no_object_lock(
    make_app: AppFactory, plivo: FakePlivo, s3: Any, bucket: str
) -> None:
    app = make_app(f"s3://{bucket}/p", **LOCKED)
    queue(app, plivo, "nolock-1")

    result = app.test_cli_runner().invoke(cli, args=["worker", "--once"])

    assert result.exit_code != 0
    assert "Object Lock" in result.output
    assert row(app, "nolock-1").status == Status.PENDING
    assert row(app, "nolock-1").attempts == 0
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    assert plivo.media_requests == []


@pytest.mark.usefixtures("worker_command_isolated")
def test_worker_command_archives_and_locks_with_an_object_lock_bucket(
    locked_app: Flask, plivo: FakePlivo, s3: Any, locked_bucket: str
) -> None:
    queue(locked_app, plivo, "lock-cli-1", NOW_MS)

    result = locked_app.test_cli_runner().invoke(cli, args=["worker", "--once"])

    assert result.exit_code == 0, result.output
    recording = row(locked_app, "lock-cli-1")
    assert recording.status == Status.ARCHIVED, recording.last_error
    head = s3.head_object(Bucket=locked_bucket, Key=recording.archive_key)
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] == retained_until(NOW_MS)


def test_healthz_is_503_when_the_bucket_has_no_object_lock_and_the_log_says_why(
    make_app: AppFactory, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(f"s3://{bucket}/p", **LOCKED)

    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body == {
        "status": "unavailable",
        "checks": {"database": "ok", "archive": "unavailable", "callbacks": "ok"},
    }
    assert bucket not in response.get_data(as_text=True)
    (why,) = [r.__dict__ for r in caplog.records if r.getMessage() == "health check failed"]
    assert why["check"] == "archive"
    assert "Object Lock" in why["error"] and bucket in why["error"]


def test_healthz_is_200_with_an_object_lock_bucket(locked_app: Flask) -> None:
    response = locked_app.test_client().get("/healthz")

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "status": "ok",
        "checks": {"database": "ok", "archive": "ok", "callbacks": "ok"},
    }


# --- legal hold ---------------------------------------------------------------------------------


def test_legal_hold_is_placed_and_lifted_on_the_archived_version_and_in_the_database(
    locked_app: Flask, plivo: FakePlivo, s3: Any, locked_bucket: str
) -> None:
    archive(locked_app, plivo, ("hold-1", NOW_MS - DAY_MS), ("free-1", NOW_MS))
    archived = get_recording(locked_app, "hold-1")["archive"]
    key, version_id = archived["key"], archived["version_id"]
    # A later write to the same key makes a newer version: the hold belongs on the archived one.
    newer = s3.put_object(Bucket=locked_bucket, Key=key, Body=b"not the recording")["VersionId"]
    assert newer != version_id

    placed = put_hold(locked_app, "hold-1", {"on": True, "reason": "SEC inquiry 2024-17"})

    assert placed.status_code == 200, placed.get_json()
    assert placed.get_json()["legal_hold"] is True
    assert placed.get_json()["recording_id"] == "hold-1"
    hold = s3.get_object_legal_hold(Bucket=locked_bucket, Key=key, VersionId=version_id)
    assert hold["LegalHold"]["Status"] == "ON"
    assert s3_hold(s3, locked_bucket, key, newer) in (None, "OFF")
    recording = row(locked_app, "hold-1")
    assert recording.legal_hold is True
    assert recording.legal_hold_reason == "SEC inquiry 2024-17"
    assert get_recording(locked_app, "hold-1")["legal_hold"] is True
    assert listed(locked_app, legal_hold="true") == ["hold-1"]
    assert listed(locked_app, legal_hold="false") == ["free-1"]
    assert exported(locked_app, legal_hold="true") == ["hold-1"]

    lifted = put_hold(locked_app, "hold-1", {"on": False})

    assert lifted.status_code == 200, lifted.get_json()
    assert lifted.get_json()["legal_hold"] is False
    hold = s3.get_object_legal_hold(Bucket=locked_bucket, Key=key, VersionId=version_id)
    assert hold["LegalHold"]["Status"] == "OFF"
    recording = row(locked_app, "hold-1")
    assert recording.legal_hold is False
    assert recording.legal_hold_reason is None
    assert get_recording(locked_app, "hold-1")["legal_hold"] is False
    assert listed(locked_app, legal_hold="true") == []
    assert listed(locked_app, legal_hold="false") == ["free-1", "hold-1"]


def test_legal_hold_changes_are_in_the_audit_log_with_the_recording(
    locked_app: Flask, plivo: FakePlivo
) -> None:
    archive(locked_app, plivo, ("audited-1", NOW_MS))
    admin = headers(locked_app, Role.ADMIN, "alice")
    client = locked_app.test_client()
    path = "/api/recordings/audited-1/legal-hold"
    placed = client.put(path, json={"on": True, "reason": "litigation"}, headers=admin)
    assert placed.status_code == 200
    assert client.put(path, json={"on": False}, headers=admin).status_code == 200

    response = client.get("/api/audit", query_string={"recording_id": "audited-1"}, headers=admin)

    assert response.status_code == 200, response.get_json()
    changes = [e for e in response.get_json()["events"] if e["method"] == "PUT"]
    assert len(changes) == 2
    for event in changes:
        assert event["path"] == path
        assert event["staff"] == "alice"
        assert event["role"] == Role.ADMIN
        assert event["status"] == 200
        assert event["recording_ids"] == ["audited-1"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (None, "invalid_on"),
        ({}, "invalid_on"),
        ({"reason": "no on"}, "invalid_on"),
        ({"on": "true", "reason": "a string"}, "invalid_on"),
        ({"on": 1, "reason": "a number"}, "invalid_on"),
        ({"on": None}, "invalid_on"),
        ([True], "invalid_on"),
        ({"on": True}, "invalid_reason"),
        ({"on": True, "reason": ""}, "invalid_reason"),
        ({"on": True, "reason": "   "}, "invalid_reason"),
        ({"on": True, "reason": 42}, "invalid_reason"),
        ({"on": True, "reason": "x" * 2001}, "invalid_reason"),
    ],
)
def test_bad_legal_hold_bodies_are_400_naming_the_field_and_change_nothing(
    locked_app: Flask, plivo: FakePlivo, s3: Any, locked_bucket: str, body: Any, code: str
) -> None:
    archive(locked_app, plivo, ("bad-body-1", NOW_MS))

    response = put_hold(locked_app, "bad-body-1", body)

    assert response.status_code == 400
    assert response.get_json()["error"] == code
    recording = row(locked_app, "bad-body-1")
    assert recording.legal_hold is False
    assert recording.legal_hold_reason is None
    held = s3_hold(s3, locked_bucket, str(recording.archive_key), str(recording.archive_version_id))
    assert held in (None, "OFF")


def test_legal_hold_body_that_is_not_json_is_400_invalid_on(
    locked_app: Flask, plivo: FakePlivo
) -> None:
    archive(locked_app, plivo, ("not-json-1", NOW_MS))

    response = locked_app.test_client().put(
        "/api/recordings/not-json-1/legal-hold",
        data="on=true",
        content_type="application/x-www-form-urlencoded",
        headers=headers(locked_app),
    )

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_on"


def test_legal_hold_on_a_recording_not_archived_yet_is_409(
    locked_app: Flask, plivo: FakePlivo
) -> None:
    queue(locked_app, plivo, "queued-1")

    response = put_hold(locked_app, "queued-1", {"on": True, "reason": "too early"})

    assert response.status_code == 409
    assert response.get_json()["error"] == "not_archived"
    assert row(locked_app, "queued-1").legal_hold is False


def test_legal_hold_on_an_unknown_recording_is_404(locked_app: Flask) -> None:
    response = put_hold(locked_app, "no-such-recording", {"on": True, "reason": "why"})

    assert response.status_code == 404
    assert response.get_json()["error"] == "recording_not_found"


@pytest.mark.parametrize("role", [Role.COMPLIANCE, Role.OPERATOR])
def test_legal_hold_needs_the_admin_role(
    locked_app: Flask, plivo: FakePlivo, s3: Any, locked_bucket: str, role: Role
) -> None:
    archive(locked_app, plivo, ("forbidden-1", NOW_MS))

    response = put_hold(locked_app, "forbidden-1", {"on": True, "reason": "not mine"}, role)

    assert response.status_code == 403
    recording = row(locked_app, "forbidden-1")
    assert recording.legal_hold is False
    held = s3_hold(s3, locked_bucket, str(recording.archive_key), str(recording.archive_version_id))
    assert held in (None, "OFF")
    anonymous = locked_app.test_client().put(
        "/api/recordings/forbidden-1/legal-hold", json={"on": True, "reason": "anyone"}
    )
    assert anonymous.status_code == 401


@pytest.mark.parametrize("archive_kind", ["s3-bucket-without-object-lock", "local-folder"])
def test_legal_hold_is_502_when_the_archive_cannot_hold(
    make_app: AppFactory, plivo: FakePlivo, bucket: str, tmp_path: Path, archive_kind: str
) -> None:
    local = archive_kind == "local-folder"
    app = make_app(f"file://{tmp_path}/archive" if local else f"s3://{bucket}/p")
    archive(app, plivo, ("unholdable-1", NOW_MS))

    response = put_hold(app, "unholdable-1", {"on": True, "reason": "evidence"})

    assert response.status_code == 502
    assert response.get_json()["error"] == "legal_hold_failed"
    assert "legal hold" in response.get_json()["message"]
    recording = row(app, "unholdable-1")
    assert recording.legal_hold is False
    assert recording.legal_hold_reason is None


# --- filtering by retention ---------------------------------------------------------------------


@pytest.fixture
def retained(locked_app: Flask, plivo: FakePlivo) -> dict[str, dt.datetime]:
    """Three archived recordings retained until 10, 20 and 29 days from now, one still queued."""
    ends = {"r-old": NOW_MS - 20 * DAY_MS, "r-mid": NOW_MS - 10 * DAY_MS, "r-new": NOW_MS - DAY_MS}
    archive(locked_app, plivo, *ends.items())
    queue(locked_app, plivo, "r-queued", NOW_MS)  # not archived: no retain-until yet
    return {recording_id: retained_until(end) for recording_id, end in ends.items()}


def test_retained_until_filters_select_by_the_objects_retain_until(
    locked_app: Flask, retained: dict[str, dt.datetime]
) -> None:
    mid = retained["r-mid"]

    # after is inclusive, before exclusive (like since/until); the queued one matches neither.
    assert listed(locked_app, retained_until_after=iso(mid)) == ["r-new", "r-mid"]
    assert listed(locked_app, retained_until_before=iso(mid)) == ["r-old"]
    assert listed(
        locked_app,
        retained_until_after=iso(mid - dt.timedelta(days=1)),
        retained_until_before=iso(mid + dt.timedelta(days=1)),
    ) == ["r-mid"]
    assert listed(locked_app, retained_until_after=iso(mid + dt.timedelta(seconds=1))) == ["r-new"]
    # A date alone is midnight UTC; a zone offset is honoured.
    old_day = retained["r-old"].date()
    assert listed(locked_app, retained_until_before=old_day.isoformat()) == []
    assert listed(
        locked_app, retained_until_before=(old_day + dt.timedelta(days=1)).isoformat()
    ) == ["r-old"]
    in_paris = mid.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    assert listed(locked_app, retained_until_before=in_paris) == ["r-old"]
    assert listed(locked_app) == ["r-queued", "r-new", "r-mid", "r-old"]
    # The retain-until the API shows is what the filters compare.
    assert get_recording(locked_app, "r-mid")["retain_until"] == iso(mid)


def test_retained_until_filters_apply_to_export_and_combine_with_others(
    locked_app: Flask, retained: dict[str, dt.datetime]
) -> None:
    mid = retained["r-mid"]

    assert exported(locked_app, retained_until_after=iso(mid)) == ["r-new", "r-mid"]
    assert exported(locked_app, retained_until_before=iso(mid), format="ndjson") == ["r-old"]
    assert put_hold(locked_app, "r-new", {"on": True, "reason": "case 9"}).status_code == 200
    assert listed(locked_app, retained_until_after=iso(mid), legal_hold="false") == ["r-mid"]
    assert listed(locked_app, retained_until_after=iso(mid), limit="1") == ["r-new"]


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ({"retained_until_after": "next year"}, "retained_until_after"),
        ({"retained_until_after": "2024-13-01"}, "retained_until_after"),
        ({"retained_until_before": "2024-02-30T00:00:00"}, "retained_until_before"),
        ({"retained_until_before": "1700000000000"}, "retained_until_before"),
        ({"retained_until_after": "x" * 256}, "retained_until_after"),
        (
            {"retained_until_after": "2030-01-02", "retained_until_before": "2030-01-01"},
            "retained_until_before",
        ),
        ({"retained_until_after": "0001-01-01T00:00:00+01:00"}, "retained_until_after"),
    ],
)
@pytest.mark.parametrize("path", ["/api/recordings", "/api/recordings/export"])
def test_bad_retained_until_values_are_400_naming_them(
    client: Any, auth: Any, query: dict[str, str], name: str, path: str
) -> None:
    response = client.get(path, query_string=query, headers=auth(Role.COMPLIANCE))

    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == f"invalid_{name}"
    assert name in body["message"]


def test_openapi_documents_the_retention_filters(locked_app: Flask) -> None:
    paths = locked_app.test_client().get("/openapi.json").get_json()["paths"]

    for path in ("/api/recordings", "/api/recordings/export"):
        names = {p["name"] for p in paths[path]["get"]["parameters"]}
        assert {"retained_until_after", "retained_until_before", "legal_hold"} <= names


def test_every_hold_change_is_kept_in_an_append_only_history_shown_with_the_recording(
    locked_app: Flask, plivo: FakePlivo
) -> None:
    archive(locked_app, plivo, ("hist-1", NOW_MS))
    assert (
        put_hold(locked_app, "hist-1", {"on": True, "reason": "FINRA 4511 request"}).status_code
        == 200
    )
    lifted = put_hold(locked_app, "hist-1", {"on": False, "reason": "matter closed"})
    assert lifted.status_code == 200
    assert lifted.get_json()["legal_hold_reason"] is None

    shown = get_recording(locked_app, "hist-1")
    history = shown["legal_hold_history"]
    assert [(e["on"], e["reason"]) for e in history] == [
        (True, "FINRA 4511 request"),
        (False, "matter closed"),
    ]
    assert all(e["staff"] and e["at"].endswith("Z") for e in history)

    events = Base.metadata.tables["legal_hold_events"]
    with services(locked_app).engine.connect() as conn:
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(events.update().values(reason="edited"))
        conn.rollback()
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(events.delete())
