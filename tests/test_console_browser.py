"""The staff console in a real browser: headless Chromium (Debian's package, driven by
Playwright) against the app served by gunicorn as the Procfile runs it, with recordings archived
in an Object Lock bucket on moto's S3."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask

from tests.conftest import AppFactory, free_port, make_bucket, post_callback, token_for
from tests.fakeplivo import FakePlivo
from tests.processes import Deployment, Process, process_env, read_procfile
from webhook import services
from webhook.archive.worker import Worker
from webhook.auth import revoke_staff
from webhook.db import transaction
from webhook.demo import tone_wav
from webhook.models import Role

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CONFERENCE = "Bond Desk"
CALLER = "+14155550101"
AUDIO_SECONDS = 2.0
TIMEOUT_MS = 20_000

sync_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    if os.environ.get("CI"):
        # CI installs it (.ci/run): there, a missing browser fails the run instead of hiding
        # the console's browser tests behind a skip.
        pytest.fail("Debian's chromium is not installed at /usr/bin/chromium", pytrace=False)
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Console:
    """A running web process, its base URL, and an app on the same database and archive."""

    base: str
    app: Flask
    deployment: Deployment


@pytest.fixture
def archive(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint, object_lock=True)


@pytest.fixture
def start_console(
    make_app: AppFactory, archive: str, database_url: str, plivo: FakePlivo, tmp_path: Path
) -> Iterator[Callable[..., Console]]:
    """`start_console(**env)`: gunicorn serving the app with the Procfile's `web` command."""
    import os

    deployments: list[Deployment] = []

    def start(**extra: str) -> Console:
        app = make_app(archive_url=f"s3://{archive}/archive")
        port = free_port()
        env = process_env(
            BIN,
            tmp_path / f"home-{port}",
            {
                "DATABASE_URL": database_url,
                "ARCHIVE_URL": f"s3://{archive}/archive",
                **{
                    key: os.environ[key]
                    for key in (
                        "AWS_ENDPOINT_URL",
                        "AWS_ACCESS_KEY_ID",
                        "AWS_SECRET_ACCESS_KEY",
                        "AWS_DEFAULT_REGION",
                    )
                },
                "PLIVO_AUTH_ID": plivo.auth_id,
                "PLIVO_AUTH_TOKEN": plivo.auth_token,
                "PLIVO_API_URL": plivo.url,
                "PUBLIC_URL": "https://archive.example.test",
                "RECORDING_HOSTS": "127.0.0.1",
                "PORT": str(port),
                "WEB_CONCURRENCY": "1",
                **extra,
            },
        )
        logs = tmp_path / f"logs-{port}"
        logs.mkdir()
        processes: list[Process] = []
        deployment = Deployment(f"http://127.0.0.1:{port}", processes)
        deployments.append(deployment)
        processes.append(Process("web", read_procfile(ROOT / "Procfile")["web"], env, ROOT, logs))
        deployment.wait_until_healthy()
        return Console(deployment.base_url, app, deployment)

    yield start
    for deployment in deployments:
        deployment.stop()


def archive_recording(app: Flask, plivo: FakePlivo) -> str:
    """A conference recorded through the API and archived by the worker: a real WAV in S3."""
    client = app.test_client()
    plivo.add_conference(
        CONFERENCE,
        members=[
            {"from": CALLER, "to": "+14155550100", "caller_name": "Dana"},
            {"from": "+442071838750", "to": "+14155550100"},
        ],
    )
    operator = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}
    started = client.post(
        f"/api/conferences/{quote(CONFERENCE)}/recording",
        headers=operator,
        json={"file_format": "wav"},
    )
    assert started.status_code == 201, started.text
    recording_id = str(started.json["recording_id"])
    params = plivo.finish_recording(
        recording_id, tone_wav(AUDIO_SECONDS), duration_ms=int(AUDIO_SECONDS * 1000)
    )
    assert post_callback(client, plivo, params).status_code == 200
    assert Worker(services(app)).run(once=True) == 1
    return recording_id


def sign_in(page: Any, base: str, token: str) -> None:
    page.goto(f"{base}/console/")
    assert page.title().startswith("Sign in")
    page.get_by_label("Staff token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"^http://[^/]+/console/$"))


def page_status(page: Any, url: str) -> int:
    response = page.goto(url)
    assert response is not None
    return int(response.status)


def test_admin_signs_in_finds_plays_holds_and_reads_the_audit_log(
    browser: Any, start_console: Callable[..., Console], plivo: FakePlivo, s3: Any, archive: str
) -> None:
    console = start_console()
    base, app = console.base, console.app
    recording_id = archive_recording(app, plivo)
    admin_token = token_for(app, Role.ADMIN, "ada")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    with console.deployment.logs_on_failure():
        sign_in(page, base, admin_token)
        cookie = next(c for c in context.cookies() if "console_session" in c["name"])
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["secure"]

        # The caller's number written as a person would type it, not as Plivo stores it.
        page.get_by_label("Participant").fill("+1 (415) 555-0101")
        page.get_by_role("button", name="Search").click()
        page.wait_for_url(re.compile(r"participant="))
        rows = page.locator("table tbody tr")
        assert rows.count() == 1
        assert CONFERENCE in rows.first.inner_text() and "Dana" in rows.first.inner_text()

        rows.first.get_by_role("link").click()
        page.wait_for_url(re.compile(rf"/console/recordings/{recording_id}"))
        assert page.title() == f"Recording {recording_id} · Recording archive"
        # The player follows the same short-lived presigned link as the API's /audio.
        duration = page.wait_for_function(
            "() => { const a = document.querySelector('audio');"
            " return a && a.readyState >= 1 && isFinite(a.duration) && a.duration; }"
        ).json_value()
        assert duration == pytest.approx(AUDIO_SECONDS, abs=0.05)
        text = page.locator("main").inner_text()
        assert "SHA-256" in text and "Not under legal hold." in text

        # The hold form without its CSRF token is refused, and nothing is held.
        page.evaluate("document.querySelector('form.hold input[name=csrf_token]').remove()")
        page.get_by_label("Reason (required)").fill("forged")
        with page.expect_navigation() as refused:
            page.get_by_role("button", name="Place a legal hold").click()
        assert refused.value.status == 403
        key = _key_of(app, recording_id)
        assert _legal_hold(s3, archive, key) == "OFF"

        page.goto(f"{base}/console/recordings/{recording_id}")
        page.get_by_label("Reason (required)").fill("SEC inquiry 2026-17")
        page.get_by_role("button", name="Place a legal hold").click()
        page.wait_for_load_state()
        assert "Under legal hold: SEC inquiry 2026-17" in page.locator("main").inner_text()
        history = page.get_by_role("table", name="Legal hold history").inner_text()
        assert "placed" in history and "ada" in history
        assert _legal_hold(s3, archive, key) == "ON"

        page.get_by_role("link", name="Audit log").click()
        page.wait_for_url(re.compile(r"/console/audit"))
        log = page.get_by_role("table", name="Access log, newest first").inner_text()
        for seen in (
            "POST /console/sign-in",
            "GET /console/?participant=%2B1+%28415%29+555-0101\t",  # empty filters left out
            f"GET /console/recordings/{recording_id}",
            f"GET /console/recordings/{recording_id}/audio",
            f"POST /console/recordings/{recording_id}/legal-hold",
        ):
            assert seen in log, seen
        assert "403" in log  # the refused form is in the log too

        # Sign-out ends the session: the old cookie opens nothing any more.
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(re.compile(r"/console/sign-in"))
        context.add_cookies([cookie])
        page.goto(f"{base}/console/recordings/{recording_id}")
        assert page.title().startswith("Sign in")
    context.close()


def _key_of(app: Flask, recording_id: str) -> str:
    from webhook.recordings import find

    with transaction(services(app).sessions) as session:
        found = find(session, recording_id)
        assert found is not None and found.archive_key
        return found.archive_key


def _legal_hold(s3: Any, bucket: str, key: str) -> str:
    """The S3 object's legal hold: ON or OFF (S3 answers no status for an object never held)."""
    answer = s3.get_object_legal_hold(Bucket=bucket, Key=key)
    return str(answer.get("LegalHold", {}).get("Status", "OFF"))


def test_compliance_sees_no_admin_actions_and_revoking_the_token_ends_the_session(
    browser: Any, start_console: Callable[..., Console], plivo: FakePlivo
) -> None:
    console = start_console()
    base, app = console.base, console.app
    recording_id = archive_recording(app, plivo)
    token = token_for(app, Role.COMPLIANCE, "carol")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    with console.deployment.logs_on_failure():
        sign_in(page, base, token)
        assert page.get_by_role("link", name="Audit log").count() == 0
        assert page.get_by_role("link", name="Failed recordings").count() == 0
        page.goto(f"{base}/console/recordings/{recording_id}")
        assert page.locator("audio").count() == 1
        assert page.locator("form.hold").count() == 0
        for admin_url in ("/console/audit", "/console/failed"):
            assert page_status(page, base + admin_url) == 403
            assert "needs the admin role" in page.locator("main").inner_text()
        # Even with the session's own CSRF token, the action is an admin's.
        page.goto(f"{base}/console/")
        csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
        answer = context.request.post(
            f"{base}/console/recordings/{recording_id}/legal-hold",
            form={"csrf_token": csrf, "on": "true", "reason": "not mine to place"},
            max_redirects=0,
        )
        assert answer.status == 403

        with transaction(services(app).sessions) as session:
            assert revoke_staff(session, "carol")
        page.goto(f"{base}/console/recordings/{recording_id}")
        assert page.title().startswith("Sign in")
    context.close()


def test_idle_session_ends_after_console_idle_minutes(
    browser: Any, start_console: Callable[..., Console]
) -> None:
    console = start_console(CONSOLE_IDLE_MINUTES="0.05")  # three seconds
    token = token_for(console.app, Role.COMPLIANCE, "ida")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    with console.deployment.logs_on_failure():
        sign_in(page, console.base, token)
        page.goto(f"{console.base}/console/?conference=x")
        assert page.title().startswith("Search recordings")
        time.sleep(3.5)
        page.goto(f"{console.base}/console/?conference=y")
        assert page.title().startswith("Sign in")
    context.close()


def test_console_is_usable_with_the_keyboard_alone(
    browser: Any, start_console: Callable[..., Console], plivo: FakePlivo
) -> None:
    console = start_console()
    recording_id = archive_recording(console.app, plivo)
    token = token_for(console.app, Role.COMPLIANCE, "kim")
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)

    def focused(expression: str) -> Any:
        return page.evaluate(
            f"(() => {{ const e = document.activeElement; return {expression}; }})()"
        )

    with console.deployment.logs_on_failure():
        page.goto(f"{console.base}/console/")
        assert focused("e.id") == "token"  # the sign-in page starts in the token field
        page.keyboard.type(token)
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"^http://[^/]+/console/$"))
        page.keyboard.press("Tab")
        assert focused("e.textContent") == "Skip to content"
        assert focused("getComputedStyle(e).outlineStyle") == "solid"  # focus is visible
        page.keyboard.press("Enter")
        page.keyboard.press("Tab")
        assert focused("e.id") == "participant"
        page.keyboard.type("1-415-555-0101")
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"participant=1-415-555-0101$"))
        for _ in range(40):
            page.keyboard.press("Tab")
            if f"/console/recordings/{recording_id}" in (focused("e.href || ''") or ""):
                break
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(rf"/console/recordings/{recording_id}"))
        assert page.title() == f"Recording {recording_id} · Recording archive"
    page.close()
