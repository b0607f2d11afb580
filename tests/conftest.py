"""Fixtures: the app on SQLite or real PostgreSQL, S3 through moto's HTTP server, a fake Plivo."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from moto.server import ThreadedMotoServer

from tests.fakeplivo import FakePlivo
from webhook import create_app, services
from webhook.auth import add_staff
from webhook.config import Settings, load, normalise_database_url
from webhook.db import transaction, upgrade
from webhook.models import Base, Role

PUBLIC_URL = "https://archive.example.test"
CALLBACK_URL = PUBLIC_URL + "/plivo/recording"
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
ON_POSTGRES = bool(TEST_DATABASE_URL)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- database -----------------------------------------------------------------------------------


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database on TEST_DATABASE_URL's server, dropped afterwards."""
    admin_url = sa.make_url(normalise_database_url(str(TEST_DATABASE_URL)))
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database with every migration applied: a fresh PostgreSQL database, or a SQLite file."""
    if not TEST_DATABASE_URL:
        template = tmp_path_factory.mktemp("db") / "template.sqlite3"
        url = f"sqlite:///{template}"
        upgrade(url)
        yield url
        return
    with fresh_postgres_database("webhook_test") as url:
        upgrade(url)
        yield url


@pytest.fixture
def database_url(migrated_database: str, tmp_path: Path) -> str:
    """A migrated, empty database for one test (PostgreSQL tables truncated, SQLite copied)."""
    if not ON_POSTGRES:
        path = tmp_path / "webhook.sqlite3"
        shutil.copyfile(migrated_database.removeprefix("sqlite:///"), path)
        return f"sqlite:///{path}"
    # Tests use several connections and processes, so they cannot share one rolled-back
    # transaction. DELETE of a few rows is much faster than TRUNCATE; the replica role skips the
    # append-only triggers for this cleanup only (the test role is a superuser).
    engine = sa.create_engine(migrated_database)
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()
    return migrated_database


# --- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 as a real HTTP server; boto3 finds it through AWS_ENDPOINT_URL."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "",
}


def make_bucket(endpoint: str, object_lock: bool = False) -> str:
    """A new, empty bucket in moto's S3."""
    name = f"archive-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
    return name


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint)


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    """A boto3 S3 client on moto, for looking at what the service stored."""
    return boto3.client("s3", endpoint_url=s3_endpoint)


# --- Plivo --------------------------------------------------------------------------------------


@pytest.fixture
def plivo() -> Iterator[FakePlivo]:
    with FakePlivo() as fake:
        yield fake


# --- the app ------------------------------------------------------------------------------------


def make_settings(database_url: str, archive_url: str, plivo: FakePlivo, **env: str) -> Settings:
    """Settings as the environment of a test deployment would give them."""
    return load(
        "/nonexistent-instance",
        {
            "DATABASE_URL": database_url,
            "ARCHIVE_URL": archive_url,
            "PLIVO_AUTH_ID": plivo.auth_id,
            "PLIVO_AUTH_TOKEN": plivo.auth_token,
            "PLIVO_API_URL": plivo.url,
            "PUBLIC_URL": PUBLIC_URL,
            "RECORDING_HOSTS": "127.0.0.1",
            "ARCHIVE_RETRY_BASE_SECONDS": "0",
            "ARCHIVE_MAX_ATTEMPTS": "3",
            **env,
        },
    )


@pytest.fixture
def settings(database_url: str, tmp_path: Path, plivo: FakePlivo) -> Settings:
    """Local-folder archive; tests that need S3 build their own with `make_settings`."""
    return make_settings(database_url, f"file://{tmp_path}/archive", plivo)


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app({"TESTING": True, "SETTINGS": settings})
    yield app
    services(app).engine.dispose()


AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app(database_url: str, tmp_path: Path, plivo: FakePlivo) -> Iterator[AppFactory]:
    """`make_app(archive_url=None, database=None, **env)`: an app with its own settings (the test
    database and a local archive folder unless given), disposed of after the test."""
    apps: list[Flask] = []

    def build(archive_url: str | None = None, database: str | None = None, **env: str) -> Flask:
        settings = make_settings(
            database or database_url, archive_url or f"file://{tmp_path}/archive", plivo, **env
        )
        app = create_app({"TESTING": True, "SETTINGS": settings})
        apps.append(app)
        return app

    yield build
    for app in apps:
        services(app).engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


def token_for(app: Flask, role: Role, name: str | None = None) -> str:
    """A fresh staff token with `role`."""
    with transaction(services(app).sessions) as session:
        return add_staff(session, name or f"{role.value}-{uuid.uuid4().hex[:6]}", role)


@pytest.fixture
def auth(app: Flask) -> Any:
    """`auth(role)` → headers carrying a bearer token of that role."""

    def headers(role: Role = Role.COMPLIANCE, name: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(app, role, name)}"}

    return headers


def post_callback(
    client: FlaskClient, plivo: FakePlivo, params: dict[str, str], nonce: str | None = None
) -> Any:
    """POST a callback signed exactly as Plivo signs it (over the public URL)."""
    headers = plivo.sign_request("POST", CALLBACK_URL, params, nonce=nonce)
    return client.post("/plivo/recording", data=params, headers=headers)


MP3_TAG = b"ID3\x04\x00\x00\x00\x00\x00\x00"  # an empty ID3v2.4 tag: how Plivo's mp3 files begin


def mp3_bytes(size: int) -> bytes:
    """`size` random bytes that begin as an mp3 file does (the worker refuses anything else)."""
    return (MP3_TAG + os.urandom(max(size - len(MP3_TAG), 0)))[:size]


TRANSCRIPTION_URL = PUBLIC_URL + "/plivo/transcription"


def post_transcription(
    client: FlaskClient, plivo: FakePlivo, params: dict[str, str], nonce: str | None = None
) -> Any:
    """POST a transcription callback signed exactly as Plivo signs it (over the public URL)."""
    headers = plivo.sign_request("POST", TRANSCRIPTION_URL, params, nonce=nonce)
    return client.post("/plivo/transcription", data=params, headers=headers)
