"""Take the README's screenshots of the staff console: `python docs/console_screenshot.py`.

Runs the app on a temporary SQLite database with an Object Lock bucket on moto's S3 (the test
extra), archives three recordings through the real callback and worker, then drives Debian's
headless Chromium through Playwright: sign in, search, open a recording, place a legal hold.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer
from playwright.sync_api import sync_playwright
from werkzeug.serving import make_server

from webhook import create_app, services
from webhook.archive.worker import Worker
from webhook.auth import add_staff
from webhook.config import load
from webhook.db import transaction, upgrade
from webhook.demo import _media_server, tone_wav
from webhook.models import Role
from webhook.recordings import RecordingReport, record_report, record_start

DOCS = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
CONFERENCES = [
    ("Bond Desk", [("+14155550101", "Dana Whitfield"), ("+442071838750", "Sam Okafor")]),
    ("FX Options Morning Call", [("+14155550199", "Lee Park"), ("+14155550101", "Dana Whitfield")]),
    ("Client: Northwind Capital", [("+13125550142", "Ruth Alvarez"), ("+14155550101", "")]),
]


def main() -> None:
    work = Path(tempfile.mkdtemp())
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="screenshot",
        AWS_SECRET_ACCESS_KEY="screenshot",  # noqa: S106 - moto's local S3, not a secret
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket="archive", ObjectLockEnabledForBucket=True)
    database = f"sqlite:///{work / 'db.sqlite3'}"
    upgrade(database)
    server_port = 5077
    settings = load(
        str(work),
        {
            "DATABASE_URL": database,
            "ARCHIVE_URL": "s3://archive/",
            "PUBLIC_URL": f"http://127.0.0.1:{server_port}",
            "RECORDING_HOSTS": "127.0.0.1",
        },
    )
    app = create_app({"SETTINGS": settings})
    svc = services(app)
    media = _media_server(tone_wav(7.0))
    now_ms = int(time.time() * 1000)
    with transaction(svc.sessions) as session:
        for n, (conference, people) in enumerate(CONFERENCES):
            recording_id = str(uuid.uuid4())
            members = [
                {
                    "member_id": str(i),
                    "from": number,
                    "to": "+14155550100",
                    "caller_name": name,
                    "direction": "inbound",
                    "join_time": str(5 * i),
                }
                for i, (number, name) in enumerate(people, start=1)
            ]
            url = f"http://127.0.0.1:{media.server_port}/{recording_id}.wav"
            record_start(session, recording_id, conference, "wav", None, url, members, "ops")
            start = now_ms - (n + 1) * 3_600_000
            record_report(
                session,
                RecordingReport(recording_id, url, conference, None, 7000, start, start + 7000),
            )
        token = add_staff(session, "maria.compliance", Role.ADMIN)
    Worker(svc).run(once=True)
    server = make_server("127.0.0.1", server_port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server_port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{base}/console/")
        page.get_by_label("Staff token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Participant").fill("+1 (415) 555-0101")
        page.get_by_role("button", name="Search").click()
        page.wait_for_load_state()
        page.screenshot(path=DOCS / "console-search.png", full_page=True)
        page.locator("table tbody tr").first.get_by_role("link").click()
        page.wait_for_function("() => document.querySelector('audio').duration > 0")
        page.get_by_label("Reason (required)").fill("FINRA inquiry 2026-0412: preserve")
        page.get_by_role("button", name="Place a legal hold").click()
        page.wait_for_load_state()
        page.screenshot(path=DOCS / "console-recording.png", full_page=True)
        browser.close()
    server.shutdown()
    media.shutdown()
    moto.stop()


if __name__ == "__main__":
    main()
