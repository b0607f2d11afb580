"""The staff console in-process: sessions and their cookie, CSRF, roles, headers, audit, pages."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from tests.conftest import (
    MP3_TAG,
    ON_POSTGRES,
    AppFactory,
    make_bucket,
    post_callback,
    post_transcription,
    token_for,
)
from tests.fakeplivo import FakePlivo
from tests.test_api import MEMBERS, Seed, audit_events, seed
from webhook import services
from webhook.archive.worker import Worker
from webhook.auth import revoke_staff
from webhook.config import ConfigError, load
from webhook.console import present
from webhook.db import transaction
from webhook.models import ConsoleSession, Recording, Role, Staff, Status

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def sign_in(client: FlaskClient, token: str, next_page: str = "") -> Any:
    return client.post("/console/sign-in", data={"token": token, "next": next_page})


def signed_in(app: Flask, role: Role = Role.COMPLIANCE, name: str | None = None) -> FlaskClient:
    client = app.test_client()
    assert sign_in(client, token_for(app, role, name)).status_code == 303
    return client


def csrf_of(client: FlaskClient, path: str = "/console/") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found, page.text
    return found.group(1)


def session_cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie("__Host-console_session")
    assert cookie is not None
    return cookie.value


# --- signing in, the cookie, signing out --------------------------------------------------------


def test_pages_without_a_session_go_to_sign_in_keeping_the_page(client):
    answer = client.get("/console/recordings/r1?q=bonds")
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/console/sign-in?next=/console/recordings/r1?q%3Dbonds"


def test_sign_in_form_takes_the_token_in_a_password_field(client):
    page = client.get("/console/sign-in")
    assert page.status_code == 200
    assert re.search(
        r'<label for="token">Staff token</label>\s*<input id="token" name="token"'
        r' type="password"',
        page.text,
    )
    assert 'method="post"' in page.text


def test_sign_in_sets_an_httponly_samesite_secure_host_cookie_behind_https(app, client):
    answer = sign_in(client, token_for(app, Role.COMPLIANCE), "/console/?conference=x")
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/console/?conference=x"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("__Host-console_session=")
    assert {"Secure", "HttpOnly", "Path=/", "SameSite=Lax"} <= set(cookie.split("; "))
    assert "Expires" not in cookie and "Domain" not in cookie
    # Only the hash of the session id is stored.
    raw = cookie.split(";")[0].split("=", 1)[1]
    with transaction(services(app).sessions) as session:
        stored = session.scalars(select(ConsoleSession.session_hash)).all()
    assert len(stored) == 1 and raw not in stored[0] and len(stored[0]) == 64


def test_on_plain_http_the_cookie_is_not_secure(make_app):
    app = make_app(PUBLIC_URL="http://127.0.0.1:5000")
    answer = sign_in(app.test_client(), token_for(app, Role.COMPLIANCE))
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("console_session=") and "Secure" not in cookie
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_unknown_token_is_refused_and_opens_nothing(app, client):
    answer = sign_in(client, "whk_not-a-token")
    assert answer.status_code == 401
    assert "unknown or revoked" in answer.text
    assert "Set-Cookie" not in answer.headers
    assert client.get("/console/").status_code == 302


def test_operator_token_cannot_sign_in(app, client):
    answer = sign_in(client, token_for(app, Role.OPERATOR, "olly"))
    assert answer.status_code == 403
    assert "for compliance and admin staff" in answer.text


@pytest.mark.parametrize(
    "target", ["https://evil.test/console/", "//evil.test/console/", "/api/audit", "/\\evil.test"]
)
def test_sign_in_goes_only_to_console_pages_afterwards(app, client, target):
    answer = sign_in(client, token_for(app, Role.COMPLIANCE), target)
    assert answer.headers["Location"] == "/console/"


def test_sign_in_posted_from_another_site_is_refused(app, client):
    answer = client.post(
        "/console/sign-in",
        data={"token": token_for(app, Role.COMPLIANCE)},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert answer.status_code == 403
    assert "Set-Cookie" not in answer.headers


def test_sign_out_ends_the_session_even_for_a_copied_cookie(app):
    client = signed_in(app)
    raw = session_cookie(client)
    answer = client.post("/console/sign-out", data={"csrf_token": csrf_of(client)})
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/console/sign-in?signed_out=1"
    replay = app.test_client()
    replay.set_cookie("__Host-console_session", raw)
    assert replay.get("/console/").status_code == 302


def test_sign_out_without_csrf_token_is_refused(app):
    client = signed_in(app)
    assert client.post("/console/sign-out").status_code == 403
    assert client.get("/console/").status_code == 200


def test_idle_session_ends_and_activity_keeps_it_alive(make_app):
    app = make_app(CONSOLE_IDLE_MINUTES="0.02")  # 1.2 s
    client = signed_in(app)
    for _ in range(3):
        time.sleep(0.6)
        assert client.get("/console/").status_code == 200  # each view is activity
    time.sleep(1.5)
    assert client.get("/console/").status_code == 302
    with transaction(services(app).sessions) as session:
        assert session.scalars(select(ConsoleSession)).all() == []


def test_revoking_the_token_ends_an_open_session(app):
    client = signed_in(app, name="rita")
    assert client.get("/console/").status_code == 200
    with transaction(services(app).sessions) as session:
        assert revoke_staff(session, "rita")
    assert client.get("/console/").status_code == 302


def test_rotating_the_token_ends_an_open_session(app):
    client = signed_in(app, name="rob")
    with transaction(services(app).sessions) as session:
        session.execute(update(Staff).where(Staff.name == "rob").values(token_hash="0" * 64))
    assert client.get("/console/").status_code == 302


def test_console_idle_minutes_setting():
    assert load("/x", {}).console_idle_minutes == 15
    assert load("/x", {"CONSOLE_IDLE_MINUTES": "0.5"}).console_idle_minutes == 0.5
    for bad in ("0", "-1", "abc", "nan", "inf", "1441"):
        with pytest.raises(ConfigError, match="CONSOLE_IDLE_MINUTES"):
            load("/x", {"CONSOLE_IDLE_MINUTES": bad})


# --- headers and audit --------------------------------------------------------------------------


def test_pages_forbid_scripts_framing_and_caching(app, client):
    for answer in (client.get("/console/sign-in"), signed_in(app).get("/console/")):
        csp = answer.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self';" in csp
        assert "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        scripts = re.findall(r"<script[^>]*>", answer.text)
        assert scripts == ['<script src="/console/static/console.js" defer>']


def test_every_page_view_is_audited_with_who_and_which_recordings(app):
    seed(app, Seed("a1", members=MEMBERS), Seed("a2"))
    client = signed_in(app, Role.COMPLIANCE, "cleo")
    client.get("/console/?conference=Room+1")
    client.get("/console/recordings/a1")
    events = audit_events(app)
    seen = [(e.staff_name, e.method, e.path, e.query, e.status) for e in events]
    assert ("cleo", "POST", "/console/sign-in", "", 303) in seen
    assert ("cleo", "GET", "/console/", "conference=Room+1", 200) in seen
    assert ("cleo", "GET", "/console/recordings/a1", "", 200) in seen
    from tests.test_api import audited_recordings

    by_path = {(e.path, e.query): e for e in events}
    assert audited_recordings(app, by_path[("/console/", "conference=Room+1")]) == ["a1", "a2"]
    assert audited_recordings(app, by_path[("/console/recordings/a1", "")]) == ["a1"]


def test_a_page_that_cannot_be_audited_is_refused(app):
    client = signed_in(app)
    engine = services(app).engine
    with engine.begin() as conn:
        if ON_POSTGRES:
            conn.execute(
                sa.text(
                    "CREATE FUNCTION audit_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "RAISE EXCEPTION 'audit disk full'; END $$"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER audit_full BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION audit_full()"
                )
            )
        else:
            conn.execute(
                sa.text(
                    "CREATE TRIGGER audit_full BEFORE INSERT ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"
                )
            )
    try:
        answer = client.get("/console/")
        assert answer.status_code == 503
        assert "could not be written to the audit log" in answer.text
        assert "Search recordings" not in answer.text
    finally:
        with engine.begin() as conn:
            conn.execute(
                sa.text("DROP TRIGGER audit_full" + (" ON audit_events" if ON_POSTGRES else ""))
            )
            if ON_POSTGRES:
                conn.execute(sa.text("DROP FUNCTION audit_full()"))


# --- search and recording pages -----------------------------------------------------------------


def test_search_uses_the_api_filters_and_shows_the_result_row(app):
    seed(app, Seed("s1", members=MEMBERS, conference="Desk 1"), Seed("s2", conference="Desk 2"))
    client = signed_in(app)
    page = client.get("/console/?participant=%2B1+(415)+555-0101")
    assert page.status_code == 200
    assert "/console/recordings/s1" in page.text and "/console/recordings/s2" not in page.text
    for shown in ("2024-01-01 10:00:00 UTC", "Desk 1", "1:00", "John 14155550101", "pending"):
        assert shown in page.text
    assert "/console/recordings/s2" in client.get("/console/?conference_prefix=Desk+2").text


def test_the_search_form_has_a_field_for_every_filter_of_the_api(app):
    spec = app.test_client().get("/openapi.json").get_json()
    filters = {
        parameter["name"]
        for parameter in spec["paths"]["/api/recordings"]["get"]["parameters"]
        if parameter["in"] == "query" and parameter["name"] != "cursor"
    }
    assert {"participant", "conference", "q", "notified", "legal_hold"} <= filters
    page = signed_in(app).get("/console/").text
    for name in filters:
        assert re.search(rf'<(input|select) id="{name}" name="{name}"', page), name
        assert f'<label for="{name}">' in page, name
    for value in ("true", "false"):
        chosen = signed_in(app).get(f"/console/?notified={value}").text
        assert f'<option value="{value}" selected>' in chosen


def test_search_pages_with_the_api_cursor_keeping_the_filters(app):
    seed(app, *(Seed(f"p{n}", start_ms=1704103200000 + n * 1000) for n in range(3)))
    client = signed_in(app)
    first = client.get("/console/?conference=Room+1&limit=2")
    assert "/console/recordings/p2" in first.text and "/console/recordings/p0" not in first.text
    next_url = re.search(r'rel="next" href="([^"]+)"', first.text).group(1).replace("&amp;", "&")
    assert "conference=Room+1" in next_url and "limit=2" in next_url
    second = client.get(next_url)
    assert "/console/recordings/p0" in second.text and "/console/recordings/p2" not in second.text
    assert 'rel="next"' not in second.text


def test_bad_filter_is_shown_as_the_api_names_it(app):
    answer = signed_in(app).get("/console/?since=yesterday")
    assert answer.status_code == 400
    assert "since must be an ISO-8601 date or date-time" in answer.text


def test_recording_page_shows_metadata_participants_and_history(app):
    seed(app, Seed("m1", members=MEMBERS, status=Status.ARCHIVED))
    with transaction(services(app).sessions) as session:
        session.execute(
            update(Recording).where(Recording.recording_id == "m1").values(archive_key="k/m1.mp3")
        )
    page = signed_in(app).get("/console/recordings/m1")
    assert page.status_code == 200
    assert "<title>Recording m1 · Recording archive</title>" in page.text
    api = app.test_client().get(
        "/api/recordings/m1", headers={"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}
    )
    joined = api.get_json()["participants"][0]["joined_at"]
    for shown in (
        "John",
        "sip:bob@example.com",
        joined,  # when the member joined, as the API says
        "k/m1.mp3",
        "ab" * 32,
        "1234 bytes",
        "No hold has ever been placed.",
    ):
        assert shown in page.text
    assert 'src="/console/recordings/m1/audio"' in page.text


def test_unknown_recording_is_a_404_page(app):
    answer = signed_in(app).get("/console/recordings/nope")
    assert answer.status_code == 404
    assert "No recording &#39;nope&#39;" in answer.text


def test_transcript_is_shown_when_the_recording_has_one_with_search_words_marked(app, plivo):
    seed(app, Seed("t1"))
    client = signed_in(app)
    assert "Transcript" not in client.get("/console/recordings/t1").text
    fields = plivo.transcribe("t1", "Sell the <b>bonds</b> today.")
    assert post_transcription(app.test_client(), plivo, fields).status_code == 200
    page = client.get("/console/recordings/t1?q=bonds+-today")
    assert "<mark>bonds</mark>" in page.text and "&lt;b&gt;" in page.text
    assert "<mark>today</mark>" not in page.text


def test_highlight_marks_whole_words_and_phrases_and_escapes_the_rest():
    marked = present.highlight('Sell <the> "bond" now; sell-side', 'sell "bond now" OR x')
    assert str(marked) == "<mark>Sell</mark> &lt;the&gt; &#34;bond&#34; now; <mark>sell</mark>-side"
    assert str(present.highlight("a <b>", None)) == "a &lt;b&gt;"


# --- roles and admin actions --------------------------------------------------------------------


def test_compliance_sees_no_admin_links_and_gets_403_on_admin_urls(app):
    seed(app, Seed("c1", status=Status.FAILED))
    client = signed_in(app, Role.COMPLIANCE)
    page = client.get("/console/")
    assert "/console/audit" not in page.text and "/console/failed" not in page.text
    assert client.get("/console/audit").status_code == 403
    assert client.get("/console/failed").status_code == 403
    csrf = csrf_of(client)
    for action, form in (("legal-hold", {"on": "true", "reason": "x"}), ("requeue", {})):
        answer = client.post(f"/console/recordings/c1/{action}", data={"csrf_token": csrf, **form})
        assert answer.status_code == 403
    with transaction(services(app).sessions) as session:
        assert session.scalars(select(Recording.status)).one() == Status.FAILED


def test_admin_sees_failed_recordings_with_their_error_and_requeues_one(app):
    seed(app, Seed("f1", status=Status.FAILED), Seed("f2"))
    with transaction(services(app).sessions) as session:
        session.execute(
            update(Recording).where(Recording.recording_id == "f1").values(last_error="HTTP 404")
        )
    client = signed_in(app, Role.ADMIN)
    page = client.get("/console/failed")
    assert "HTTP 404" in page.text and "/console/recordings/f2" not in page.text
    refused = client.post("/console/recordings/f1/requeue")
    assert refused.status_code == 403
    done = client.post("/console/recordings/f1/requeue", data={"csrf_token": csrf_of(client)})
    assert done.status_code == 303
    with transaction(services(app).sessions) as session:
        assert (
            session.scalars(select(Recording.status).where(Recording.recording_id == "f1")).one()
            == Status.PENDING
        )
    assert "No recording has failed." in client.get("/console/failed").text


def test_admin_audit_page_filters_like_the_api(app):
    seed(app, Seed("x1"))
    reader = signed_in(app, Role.COMPLIANCE, "rex")
    reader.get("/console/recordings/x1")
    admin = signed_in(app, Role.ADMIN, "ada")
    page = admin.get("/console/audit?staff=rex&recording_id=x1")
    assert page.status_code == 200
    assert "GET /console/recordings/x1" in page.text and "rex (compliance)" in page.text
    assert "POST /console/sign-in" not in page.text
    assert admin.get("/console/audit?since=nope").status_code == 400


def test_legal_hold_on_a_local_archive_is_refused_as_the_api_refuses_it(app):
    seed(app, Seed("h1", status=Status.ARCHIVED))
    with transaction(services(app).sessions) as session:
        session.execute(
            update(Recording).where(Recording.recording_id == "h1").values(archive_key="k/h1")
        )
    client = signed_in(app, Role.ADMIN)
    csrf = csrf_of(client, "/console/recordings/h1")
    no_reason = client.post(
        "/console/recordings/h1/legal-hold", data={"csrf_token": csrf, "on": "true"}
    )
    assert no_reason.status_code == 400 and "a reason is required" in no_reason.text
    local = client.post(
        "/console/recordings/h1/legal-hold",
        data={"csrf_token": csrf, "on": "true", "reason": "inquiry"},
    )
    assert local.status_code == 502 and "S3 archive with Object Lock" in local.text


def test_admin_places_then_lifts_a_legal_hold_and_s3_and_the_history_agree_each_time(
    make_app: AppFactory, plivo: FakePlivo, s3_endpoint: str, s3: Any
) -> None:
    locked = make_bucket(s3_endpoint, object_lock=True)
    app = make_app(f"s3://{locked}", RETENTION_DAYS="30", OBJECT_LOCK_MODE="GOVERNANCE")
    params = plivo.finish_recording("hold-1", MP3_TAG + b"held audio" * 50)
    assert post_callback(app.test_client(), plivo, params).status_code == 200
    assert Worker(services(app)).run(once=True) == 1
    with services(app).sessions() as session:
        stored = session.scalars(select(Recording).where(Recording.recording_id == "hold-1")).one()
    where = {"Bucket": locked, "Key": stored.archive_key, "VersionId": stored.archive_version_id}
    client = signed_in(app, Role.ADMIN, name="ada")
    page = "/console/recordings/hold-1"

    for on, reason, in_s3 in (("true", "inquiry 7", "ON"), ("false", "inquiry 7 closed", "OFF")):
        answer = client.post(
            f"{page}/legal-hold",
            data={"csrf_token": csrf_of(client, page), "on": on, "reason": reason},
        )
        assert answer.status_code == 303, answer.text
        assert s3.get_object_legal_hold(**where)["LegalHold"]["Status"] == in_s3
        with services(app).sessions() as session:
            held = session.scalars(select(Recording).where(Recording.recording_id == "hold-1"))
            assert held.one().legal_hold is (on == "true")

    shown = client.get(page).text
    assert shown.index("inquiry 7") < shown.index("inquiry 7 closed")
    actions = [
        (event.staff_name, event.method, event.status)
        for event in audit_events(app)
        if event.path == f"{page}/legal-hold"
    ]
    assert actions == [("ada", "POST", 303)] * 2


def test_signing_in_again_replaces_the_browsers_session(app):
    client = signed_in(app)
    first = session_cookie(client)
    assert sign_in(client, token_for(app, Role.COMPLIANCE)).status_code == 303
    assert session_cookie(client) != first
    replay = app.test_client()
    replay.set_cookie("__Host-console_session", first)
    assert replay.get("/console/").status_code == 302


def test_search_hits_show_their_transcript_snippet_with_the_words_marked(app, plivo):
    seed(app, Seed("n1"), Seed("n2"))
    fields = plivo.transcribe("n1", "Speaker 0: we should sell the bonds today")
    assert post_transcription(app.test_client(), plivo, fields).status_code == 200
    page = signed_in(app).get("/console/?q=bonds")
    assert "n1" in page.text and "n2" not in page.text
    assert "<mark>bonds</mark>" in page.text and "«" not in page.text


def test_snippet_marks_become_mark_elements_and_the_rest_is_escaped():
    marked = present.marked("…sell the «bonds» <b>now</b> & «later»…")
    assert str(marked) == (
        "…sell the <mark>bonds</mark> &lt;b&gt;now&lt;/b&gt; &amp; <mark>later</mark>…"
    )
