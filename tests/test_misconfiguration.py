"""Each misconfiguration stops the Procfile's processes at start with the sentence naming the
variable, before anything is accepted or written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from tests.conftest import PUBLIC_URL, free_port
from tests.fakeplivo import FakePlivo
from tests.processes import process_env, read_procfile
from webhook.db import make_engine
from webhook.models import Base

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def table_rows(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return sum(
                connection.scalar(select(func.count()).select_from(table)) or 0
                for table in Base.metadata.sorted_tables
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (
            {"ARCHIVE_URL": "my-bucket"},
            "ARCHIVE_URL 'my-bucket' has no scheme; write s3://my-bucket",
        ),
        (
            {
                "DYNO": "web.1",
                "ARCHIVE_URL": "file://{tmp}/archive",
                # A PostgreSQL URL whatever the test database, so the archive is what is refused.
                "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            },
            "ARCHIVE_URL is a local folder",
        ),
        ({"DYNO": "web.1", "DATABASE_URL": "sqlite:///{tmp}/db.sqlite3"}, "DATABASE_URL is SQLite"),
        ({"PUBLIC_URL": "archive.example.test"}, "PUBLIC_URL must be an absolute URL"),
    ],
)
def test_web_worker_and_release_refuse_to_start_naming_the_setting(
    change: dict[str, str],
    sentence: str,
    database_url: str,
    bucket: str,
    s3_endpoint: str,
    plivo: FakePlivo,
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = {
        "DATABASE_URL": database_url,
        "ARCHIVE_URL": f"s3://{bucket}/p",
        "AWS_ENDPOINT_URL": s3_endpoint,
        **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"],
        "PLIVO_AUTH_ID": plivo.auth_id,
        "PLIVO_AUTH_TOKEN": plivo.auth_token,
        "PLIVO_API_URL": plivo.url,
        "PUBLIC_URL": PUBLIC_URL,
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
    }
    settings.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    env = process_env(BIN, tmp_path / "home", settings)
    procfile = read_procfile(ROOT / "Procfile")
    for kind in ("web", "worker", "release"):
        done = subprocess.run(
            ["bash", "-c", procfile[kind]],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode != 0, f"{kind} started:\n{output}"
        assert sentence in output, f"{kind}:\n{output}"
        if kind != "web":  # gunicorn prints the traceback; the commands print one line and a hint
            assert "Traceback" not in output, output
    with pytest.raises(requests.ConnectionError):
        requests.post(f"http://127.0.0.1:{port}/plivo/recording", timeout=5)
    assert table_rows(database_url) == 0
    assert list(tmp_path.glob("archive*")) == [] and not (tmp_path / "db.sqlite3").exists()
