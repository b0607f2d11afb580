"""Attacks on the staff API, the audit log and what the service tells strangers, each refused."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import threading
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, text

from tests.conftest import AppFactory, make_bucket, post_callback, token_for
from tests.fakeplivo import FakePlivo
from tests.test_api import Seed, seed
from tests.test_compliance import LOCKED, NOW_MS, archive, put_hold, row
from webhook import services
from webhook.archive.storage import StorageError
from webhook.config import ConfigError, load
from webhook.db import request_session
from webhook.logs import JSONFormatter
from webhook.models import (
    AuditAnonymous,
    AuditEvent,
    AuditRecording,
    LegalHoldEvent,
    Recording,
    Role,
)


def events(app: Flask) -> list[AuditEvent]:
    with services(app).sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def bearer(app: Flask, role: Role = Role.COMPLIANCE, name: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(app, role, name)}"}


# --- legal hold: S3, the row and the history never disagree ------------------------------------


@pytest.fixture
def hold_bucket(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint, object_lock=True)


@pytest.fixture
def hold_app(make_app: AppFactory, hold_bucket: str) -> Flask:
    return make_app(f"s3://{hold_bucket}/p", **LOCKED)


def s3_status(app: Flask, s3: Any, bucket: str, recording_id: str) -> str:
    recording = row(app, recording_id)
    hold = s3.get_object_legal_hold(
        Bucket=bucket, Key=recording.archive_key, VersionId=recording.archive_version_id
    )
    return str(hold["LegalHold"]["Status"])


def history(app: Flask, recording_id: str) -> list[bool]:
    with services(app).sessions() as session:
        return list(
            session.scalars(
                select(LegalHoldEvent.on)
                .where(LegalHoldEvent.recording_id == recording_id)
                .order_by(LegalHoldEvent.id)
            )
        )


@pytest.mark.parametrize(
    "reason", ["a NUL \x00 inside", "a bell \x07", "a lone surrogate \ud800", "x" * 2001, 17]
)
def test_a_bad_reason_changes_neither_s3_nor_the_database(
    hold_app: Flask, plivo: FakePlivo, s3: Any, hold_bucket: str, reason: Any
) -> None:
    archive(hold_app, plivo, ("held-1", NOW_MS))
    assert put_hold(hold_app, "held-1", {"on": True, "reason": "inquiry"}).status_code == 200

    response = put_hold(hold_app, "held-1", {"on": False, "reason": reason})

    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == "invalid_reason"
    assert s3_status(hold_app, s3, hold_bucket, "held-1") == "ON"
    assert row(hold_app, "held-1").legal_hold is True
    assert history(hold_app, "held-1") == [True]


def test_a_reason_may_span_lines(hold_app: Flask, plivo: FakePlivo) -> None:
    archive(hold_app, plivo, ("held-2", NOW_MS))
    reason = "SEC inquiry 2024-17\r\n\tsee the letter of 3 May"
    response = put_hold(hold_app, "held-2", {"on": True, "reason": reason})
    assert response.status_code == 200, response.get_json()
    assert row(hold_app, "held-2").legal_hold_reason == reason


def test_concurrent_place_and_lift_leave_s3_the_row_and_the_history_agreeing(
    hold_app: Flask, plivo: FakePlivo, s3: Any, hold_bucket: str
) -> None:
    archive(hold_app, plivo, ("contested", NOW_MS))
    admins = [bearer(hold_app, Role.ADMIN, f"admin-{n}") for n in range(4)]
    path = "/api/recordings/contested/legal-hold"
    rounds, disagreements = 15, []
    for round_ in range(rounds):
        start = threading.Barrier(len(admins))
        statuses: list[int] = []

        def change(
            n: int, start: threading.Barrier = start, statuses: list[int] = statuses
        ) -> None:
            body = {"on": True, "reason": "inquiry"} if n % 2 else {"on": False}
            client = hold_app.test_client()
            start.wait()
            statuses.append(client.put(path, json=body, headers=admins[n]).status_code)

        threads = [threading.Thread(target=change, args=(n,)) for n in range(len(admins))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * len(admins)
        in_s3 = s3_status(hold_app, s3, hold_bucket, "contested") == "ON"
        in_row = row(hold_app, "contested").legal_hold
        last_event = history(hold_app, "contested")[-1]
        if not in_s3 == in_row == last_event:
            disagreements.append((round_, in_s3, in_row, last_event))
    assert disagreements == []
    assert len(history(hold_app, "contested")) == rounds * len(admins)


def test_a_failed_s3_call_changes_nothing_and_says_nothing_of_s3(
    make_app: AppFactory, plivo: FakePlivo, bucket: str
) -> None:
    # A bucket without Object Lock refuses legal holds.
    app = make_app(f"s3://{bucket}/p")
    archive(app, plivo, ("unlockable", NOW_MS))

    response = put_hold(app, "unlockable", {"on": True, "reason": "inquiry"})

    assert response.status_code == 502
    assert response.get_json()["error"] == "legal_hold_failed"
    assert bucket not in response.get_data(as_text=True)
    assert row(app, "unlockable").legal_hold is False
    assert history(app, "unlockable") == []


class AppliedThenTimedOut:
    """A storage whose first legal-hold call reaches S3 but reports a failure (a lost answer)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.calls: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def set_legal_hold(self, key: str, version_id: str | None, on: bool) -> None:
        self.calls.append(on)
        self.storage.set_legal_hold(key, version_id, on)
        if len(self.calls) == 1:
            raise StorageError("read timeout")


def test_an_s3_change_whose_answer_is_lost_is_undone(
    hold_app: Flask, plivo: FakePlivo, s3: Any, hold_bucket: str
) -> None:
    archive(hold_app, plivo, ("lost-answer", NOW_MS))
    svc = services(hold_app)
    flaky = AppliedThenTimedOut(svc.storage)
    svc.__dict__["storage"] = flaky  # the cached storage, replaced for this app only

    response = put_hold(hold_app, "lost-answer", {"on": True, "reason": "inquiry"})

    assert response.status_code == 502
    assert flaky.calls == [True, False]
    assert s3_status(hold_app, s3, hold_bucket, "lost-answer") == "OFF"
    assert row(hold_app, "lost-answer").legal_hold is False
    assert history(hold_app, "lost-answer") == []


# --- the audit records exactly what was asked --------------------------------------------------


def test_an_export_filter_cannot_hide_behind_padding_or_percent_encoding(
    app: Flask, client: Any
) -> None:
    seed(app, Seed("target-1", conference="target"), Seed("other-1", conference="other"))
    headers = bearer(app, name="mallory")
    query = "pad=" + "x" * 3990 + "&%63onference=target"

    response = client.get(f"/api/recordings/export?{query}", headers=headers)

    assert response.status_code == 200
    exported = [
        json.loads(line)["recording_id"] for line in response.get_data(as_text=True).split()
    ]
    assert exported == ["target-1"]
    (event,) = events(app)
    assert event.staff_name == "mallory"
    assert event.query == query
    assert event.params == {"pad": ["x" * 3990], "conference": ["target"]}
    listed = client.get("/api/audit", headers=bearer(app, Role.ADMIN)).get_json()["events"]
    assert listed[-1]["params"] == {"pad": ["x" * 3990], "conference": ["target"]}


def test_a_request_too_long_to_audit_whole_is_refused_and_audited(app: Flask, client: Any) -> None:
    seed(app, Seed("target-2", conference="target"))
    query = "pad=" + "x" * 4100 + "&conference=target"

    response = client.get(f"/api/recordings/export?{query}", headers=bearer(app, name="mallory"))

    assert response.status_code == 414
    assert response.get_json()["error"] == "request_too_long"
    assert "target-2" not in response.get_data(as_text=True)
    (event,) = events(app)
    assert (event.staff_name, event.status, event.params) == ("mallory", 414, None)


def test_repeated_parameters_are_all_recorded(app: Flask, client: Any) -> None:
    response = client.get("/api/recordings?conference=a&conference=b&limit=5", headers=bearer(app))
    assert response.status_code == 200
    assert events(app)[0].params == {"conference": ["a", "b"], "limit": ["5"]}


# --- anonymous requests cannot fill the database -------------------------------------------------


def test_anonymous_requests_are_counted_in_bounded_rows(
    app: Flask, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tally is kept per minute: the clock is fixed so that the flood falls in one.
    minute = dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC)
    ticks = iter(range(10_000))
    monkeypatch.setattr(
        "webhook.audit.utcnow", lambda: minute + dt.timedelta(milliseconds=next(ticks))
    )
    agent = "flood/" + "A" * 8000
    query = "q=" + "z" * 4000
    for n in range(40):
        headers = (
            {"User-Agent": agent}
            if n % 2
            else {"Authorization": "Bearer whk_guess", "User-Agent": agent}
        )
        response = client.get(f"/api/recordings/{'p' * 2000}?{query}", headers=headers)
        assert response.status_code == 401
    assert client.get("/api/nothing-here", headers={"User-Agent": agent}).status_code == 404

    assert events(app) == []
    with services(app).sessions() as session:
        tallies = list(session.scalars(select(AuditAnonymous).order_by(AuditAnonymous.status)))
    assert [(t.status, t.count, t.remote_addr, t.method) for t in tallies] == [
        (401, 40, "127.0.0.1", "GET"),
        (404, 1, "127.0.0.1", "GET"),
    ]
    for tally in tallies:
        assert len(tally.path) <= 256 and len(tally.user_agent or "") <= 256
        assert tally.first_at < tally.last_at or tally.count == 1

    # The next minute opens a row of its own.
    monkeypatch.setattr("webhook.audit.utcnow", lambda: minute + dt.timedelta(seconds=61))
    assert client.get("/api/recordings", headers={"User-Agent": agent}).status_code == 401
    with services(app).sessions() as session:
        rows = session.execute(
            select(
                AuditAnonymous.window_start, AuditAnonymous.status, AuditAnonymous.count
            ).order_by(AuditAnonymous.window_start, AuditAnonymous.status)
        ).all()
    assert [tuple(r) for r in rows] == [
        (minute, 401, 40),
        (minute, 404, 1),
        (minute + dt.timedelta(minutes=1), 401, 1),
    ]


def test_staff_user_agent_is_capped(app: Flask, client: Any) -> None:
    headers = {**bearer(app), "User-Agent": "u" * 10_000}
    assert client.get("/api/recordings", headers=headers).status_code == 200
    assert len(events(app)[0].user_agent or "") == 256


def test_a_bearer_of_a_valid_token_on_an_unknown_path_is_named(app: Flask, client: Any) -> None:
    assert client.get("/api/nothing", headers=bearer(app, name="nina")).status_code == 404
    assert [(e.staff_name, e.status) for e in events(app)] == [("nina", 404)]


# --- CSV export opens as text in a spreadsheet --------------------------------------------------


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_text(
    app: Flask, client: Any
) -> None:
    conferences = [
        '=HYPERLINK("http://127.0.0.1:1/x","click")',
        "@SUM(A1)",
        "-2+3",
        "\tTab",
        "Plain",
    ]
    seed(
        app,
        *(
            Seed(
                f"csv-{n}",
                conference=name,
                start_ms=1_700_000_000_000 + n,
                members=[{"member_id": "1", "from": "+14155550100", "to": "+14155550101"}],
            )
            for n, name in enumerate(conferences)
        ),
    )
    headers = bearer(app)

    export = "/api/recordings/export?format="
    as_csv = client.get(export + "csv", headers=headers).get_data(as_text=True)
    as_ndjson = client.get(export + "ndjson", headers=headers).get_data(as_text=True)

    rows = {r["recording_id"]: r for r in csv.DictReader(io.StringIO(as_csv))}
    for n, name in enumerate(conferences):
        cell = rows[f"csv-{n}"]["conference_name"]
        assert cell == (name if name == "Plain" else "'" + name)
        assert rows[f"csv-{n}"]["participants"] == "'+14155550100>+14155550101"
    exact = {r["recording_id"]: r for r in map(json.loads, as_ndjson.splitlines())}
    assert [exact[f"csv-{n}"]["conference_name"] for n in range(len(conferences))] == conferences
    assert exact["csv-0"]["participants"][0]["from"] == "+14155550100"


# --- bad input is a 400 naming the field, and audited --------------------------------------------


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("conference=a%00b", "invalid_conference"),
        ("participant=%00", "invalid_participant"),
        ("q=x%01", "invalid_q"),
        ("limit=%C2%B2", "invalid_limit"),
        ("limit=%D9%A3", "invalid_limit"),
        ("conference=%FF", "invalid_query"),
    ],
)
def test_bad_filters_are_400_naming_the_field_and_audited(
    app: Flask, client: Any, query: str, code: str
) -> None:
    response = client.get(f"/api/recordings?{query}", headers=bearer(app, name="carol"))

    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == code
    (event,) = events(app)
    assert (event.staff_name, event.status, event.query) == ("carol", 400, query)


@pytest.mark.parametrize("recording_id", ["a%00b", "r" * 65, "r" * 2000, "-dash", "a%0Ab"])
def test_bad_recording_id_in_the_path_is_400_and_audited(
    app: Flask, client: Any, recording_id: str
) -> None:
    for suffix in ("", "/audio"):
        response = client.get(f"/api/recordings/{recording_id}{suffix}", headers=bearer(app))
        assert response.status_code == 400, response.get_json()
        assert response.get_json()["error"] == "invalid_recording_id"
    audited = events(app)
    assert [e.status for e in audited] == [400, 400]
    with services(app).sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditRecording)) == 0
    assert "\x00" not in audited[0].path and "\n" not in audited[0].path


def test_audit_filter_with_nul_is_400(app: Flask, client: Any) -> None:
    headers = bearer(app, Role.ADMIN)
    for query, code in (
        ("staff=a%00", "invalid_staff"),
        ("recording_id=%00", "invalid_recording_id"),
    ):
        response = client.get(f"/api/audit?{query}", headers=headers)
        assert (response.status_code, response.get_json()["error"]) == (400, code)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("record_url", "http://[::1/a"),
        ("record_url", "http://127.0.0.1:99999/a.mp3"),
        ("record_url", "http://127.0.0.1/a\x00.mp3"),
        ("conference_name", "Room\x001"),
        ("api_id", "api\x00"),
        ("recording_duration", "1\x00"),
        ("recording_start_ms", "1700000000000\x00"),
    ],
)
def test_bad_callback_field_is_400_naming_it_and_nothing_is_stored(
    app: Flask, client: Any, plivo: FakePlivo, field: str, value: str
) -> None:
    params = plivo.finish_recording("bad-field", b"audio")
    params[field] = value

    response = post_callback(client, plivo, params)

    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == f"invalid_{field}"
    with services(app).sessions() as session:
        assert session.scalar(select(func.count()).select_from(Recording)) == 0


# --- what strangers and logs are told ------------------------------------------------------------


def test_anonymous_healthz_names_no_bucket_or_endpoint(
    make_app: AppFactory, s3_endpoint: str
) -> None:
    app = make_app("s3://no-such-bucket-here/p")

    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    assert response.get_json()["checks"]["archive"] == "unavailable"
    said = response.get_data(as_text=True)
    assert "no-such-bucket-here" not in said and "127.0.0.1" not in said
    assert "details" not in response.get_json()
    compliance = app.test_client().get("/healthz", headers=bearer(app, Role.COMPLIANCE))
    assert "no-such-bucket-here" not in compliance.get_data(as_text=True)
    operator = app.test_client().get("/healthz", headers=bearer(app, Role.OPERATOR))
    assert operator.status_code == 503
    assert "no-such-bucket-here" in operator.get_json()["details"]["archive"]


@pytest.mark.parametrize("failure", ["unreachable", "rejected"])
def test_plivo_errors_shown_to_operators_hold_no_auth_id_or_url(
    make_app: AppFactory, plivo: FakePlivo, failure: str
) -> None:
    if failure == "unreachable":
        app = make_app(PLIVO_API_URL="http://127.0.0.1:1")
    else:
        app = make_app()
        plivo.add_conference("Room 1")
        plivo.api_faults = [400]
        plivo.api_fault_body = {
            "error": f"invalid request to {plivo.url}/v1/Account/{plivo.auth_id}/Conference/",
            "api_id": "x",
        }

    response = app.test_client().post(
        "/api/conferences/Room%201/recording", headers=bearer(app, Role.OPERATOR)
    )

    assert response.status_code in (400, 502)
    said = response.get_data(as_text=True)
    assert plivo.auth_id not in said
    assert "127.0.0.1" not in said and "/v1/" not in said


def test_database_errors_are_logged_without_parameters_or_quoted_values(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    secret = "X-Plivo-Signature-V3=SECRET-SIGNATURE-VALUE"

    @app.get("/boom")
    def boom() -> str:
        session = request_session()
        for _ in range(2):  # the second insert of the same key fails
            session.execute(
                text(
                    "INSERT INTO staff (name, role, token_hash, created_at) "
                    "VALUES ('boom', 'admin', :n, CURRENT_TIMESTAMP)"
                ),
                {"n": secret},
            )
        return "unreachable"

    with caplog.at_level(logging.INFO, logger="webhook"):
        response = app.test_client().get("/boom")

    assert response.status_code == 500
    lines = [JSONFormatter().format(r) for r in caplog.records if r.name.startswith("webhook")]
    assert any("database error" in line for line in lines)
    assert not [line for line in lines if "SECRET-SIGNATURE" in line]


# --- the client address behind the platform's router ---------------------------------------------


def test_trusted_proxy_hops_default_to_none_off_platform_and_the_router_on_a_dyno() -> None:
    assert load("/srv", {}).trusted_proxy_hops == 0
    dyno = {"DYNO": "web.1", "DATABASE_URL": "postgresql://h/d", "ARCHIVE_URL": "s3://archive-b/p"}
    assert load("/srv", dyno).trusted_proxy_hops == 1
    assert load("/srv", {**dyno, "TRUSTED_PROXY_HOPS": "0"}).trusted_proxy_hops == 0
    assert load("/srv", {"TRUSTED_PROXY_HOPS": "2"}).trusted_proxy_hops == 2


@pytest.mark.parametrize("raw", ["-1", "one", "6", "1.5"])
def test_bad_trusted_proxy_hops_is_refused_naming_it(raw: str) -> None:
    with pytest.raises(ConfigError, match="TRUSTED_PROXY_HOPS"):
        load("/srv", {"TRUSTED_PROXY_HOPS": raw})


@pytest.mark.parametrize(
    ("hops", "forwarded_for", "recorded"),
    [
        ("1", "127.0.0.9", "127.0.0.9"),
        # The client wrote the first entry itself; the router appended what it saw.
        ("1", "127.0.0.66, 127.0.0.9", "127.0.0.9"),
        ("0", "127.0.0.9", "127.0.0.2"),
    ],
)
def test_audit_records_the_client_address_the_trusted_router_saw(
    make_app: AppFactory, hops: str, forwarded_for: str, recorded: str
) -> None:
    app = make_app(TRUSTED_PROXY_HOPS=hops)
    headers = {**bearer(app), "X-Forwarded-For": forwarded_for}
    client = app.test_client()
    assert (
        client.get(
            "/api/recordings", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.2"}
        ).status_code
        == 200
    )
    assert (
        client.get(
            "/api/recordings",
            headers={"X-Forwarded-For": forwarded_for},
            environ_base={"REMOTE_ADDR": "127.0.0.2"},
        ).status_code
        == 401
    )
    assert [e.remote_addr for e in events(app)] == [recorded]
    with services(app).sessions() as session:
        assert session.scalars(select(AuditAnonymous.remote_addr)).one() == recorded
