"""Faults injected against the real parts, and proof that nothing is lost or archived twice.

Workers and gunicorn run as real processes (the Procfile's commands) and are killed with SIGKILL
or SIGTERM; moto's S3 server is stopped and restarted; PostgreSQL connections are cut and refused
through a TCP proxy; media hosts 404, stall, redirect, fail and trickle their bytes. After each
fault every recording must end either archived exactly once (the bytes in S3 are the media's,
the row's SHA-256 is theirs, one object version per key in a versioned bucket, no multipart
upload left open) or `failed` with its reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import (
    CALLBACK_URL,
    MP3_TAG,
    ON_POSTGRES,
    PUBLIC_URL,
    AppFactory,
    free_port,
    make_bucket,
    mp3_bytes,
    post_callback,
)
from tests.fakeplivo import NONCE_HEADER, FakePlivo
from tests.processes import Deployment, Process, process_env, read_procfile, socket_inodes
from webhook import services
from webhook.archive.storage import PART_SIZE, HashingReader, Interrupted
from webhook.archive.worker import Worker
from webhook.db import execute_autocommitted, make_engine
from webhook.models import CallbackLog, Recording, Status, utcnow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROCFILE = read_procfile(ROOT / "Procfile")
MiB = 1024 * 1024
PART = PART_SIZE  # the archive's multipart part size
LEASE_SECONDS = 5  # the smallest ARCHIVE_LEASE_SECONDS the service accepts
POLL = 0.05
HTTP_TIMEOUT = 30.0

several_workers_need_postgres = pytest.mark.skipif(
    not ON_POSTGRES,
    reason="several worker processes claim through PostgreSQL's FOR UPDATE SKIP LOCKED "
    "(set TEST_DATABASE_URL)",
)
outage_needs_postgres = pytest.mark.skipif(
    not ON_POSTGRES,
    reason="a database outage is cut TCP connections to PostgreSQL; SQLite has none "
    "(set TEST_DATABASE_URL)",
)


# --- waiting ------------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = POLL) -> Any:
    """Poll `check` until it answers something truthy; that answer, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s (last: {answer!r})")
        time.sleep(interval)


# --- the database, read straight ----------------------------------------------------------------


class Rows:
    """Reads (and for arranging faults, writes) the test database directly, outside the service."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def recording(self, recording_id: str) -> Recording:
        with self.sessions() as session:
            return session.scalars(
                select(Recording).where(Recording.recording_id == recording_id)
            ).one()

    def count(self, model: Any, *where: Any) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    def run(self, work: Callable[[Session], Any]) -> Any:
        with self.sessions() as session, session.begin():
            return work(session)

    def status(self, recording_id: str) -> str:
        return self.recording(recording_id).status


@pytest.fixture
def rows(database_url: str) -> Iterator[Rows]:
    reader = Rows(database_url)
    yield reader
    reader.engine.dispose()


# --- S3 -----------------------------------------------------------------------------------------


def object_versions(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    listed = s3.list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in listed.get("Versions", []) if v["Key"] == key]


def open_uploads(s3: Any, bucket: str, key: str | None = None) -> list[dict[str, Any]]:
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return [u for u in uploads if key is None or u["Key"] == key]


def uploaded_parts(s3: Any, bucket: str, key: str) -> int:
    """How many parts the open multipart uploads of `key` hold so far."""
    return sum(
        len(s3.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
        for u in open_uploads(s3, bucket, key)
    )


def versioned(s3: Any, bucket: str) -> str:
    """Turn versioning on, so that an object written twice shows as two versions."""
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def assert_archived_once(
    rows: Rows, s3: Any, bucket: str, recording_id: str, content: bytes
) -> Recording:
    """Archived, byte-exact, its SHA-256 on file, written once, no upload left open."""
    row = rows.recording(recording_id)
    assert row.status == Status.ARCHIVED, (recording_id, row.status, row.last_error)
    digest = hashlib.sha256(content).hexdigest()
    assert row.archive_sha256 == digest, recording_id
    assert row.archive_size == len(content), recording_id
    assert row.last_error is None, row.last_error
    assert row.lease_token is None
    assert row.archive_key is not None
    stored = s3.get_object(Bucket=bucket, Key=row.archive_key)["Body"].read()
    same = stored == content  # not in the assert: pytest would diff megabytes
    assert same, f"{recording_id}: S3 holds {len(stored)} other bytes"
    assert hashlib.sha256(stored).hexdigest() == digest
    versions = object_versions(s3, bucket, row.archive_key)
    assert len(versions) == 1, f"{recording_id} written {len(versions)} times"
    assert row.archive_version_id == versions[0]["VersionId"]
    assert open_uploads(s3, bucket, row.archive_key) == []
    return row


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """The processes a test starts; all stopped at its end, their logs printed if it failed."""

    def __init__(self, logs: Path) -> None:
        self.logs_dir = logs
        self.started: list[Process] = []

    def start(self, name: str, command: str, env: dict[str, str]) -> Process:
        process = Process(name, command, env, ROOT, self.logs_dir)
        self.started.append(process)
        return process

    def worker(self, name: str, env: dict[str, str]) -> Process:
        return self.start(name, PROCFILE["worker"], env)

    def logs(self) -> str:
        return Deployment("", self.started).logs()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Processes(logs)
    yield started
    for process in started.started:
        process.stop(grace_seconds=5)
    # Captured, so shown only when the test failed.
    print(started.logs())


def kill(process: Process, signum: int = signal.SIGKILL) -> None:
    """Signal the whole process group, as the platform does."""
    with suppress(ProcessLookupError):
        os.killpg(process.popen.pid, signum)


@pytest.fixture
def env(
    database_url: str, plivo: FakePlivo, tmp_path: Path, s3_endpoint: str
) -> Callable[..., dict[str, str]]:
    """`env(archive_url, **overrides)`: a process environment as test_e2e's deployment has it."""

    def build(archive_url: str, **overrides: str) -> dict[str, str]:
        return process_env(
            BIN,
            tmp_path / "home",
            {
                "DATABASE_URL": database_url,
                "ARCHIVE_URL": archive_url,
                "AWS_ENDPOINT_URL": s3_endpoint,
                **{
                    key: os.environ[key]
                    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
                },
                "PLIVO_AUTH_ID": plivo.auth_id,
                "PLIVO_AUTH_TOKEN": plivo.auth_token,
                "PLIVO_API_URL": plivo.url,
                "PUBLIC_URL": PUBLIC_URL,
                "RECORDING_HOSTS": "127.0.0.1",
                "ARCHIVE_LEASE_SECONDS": str(LEASE_SECONDS),
                "ARCHIVE_RETRY_BASE_SECONDS": "1",
                **overrides,
            },
        )

    return build


# --- queueing recordings, as a signed callback to an app on the same database -------------------


@pytest.fixture
def web(database_url: str, bucket: str, make_app: AppFactory) -> Callable[..., Flask]:
    """`web(database=..., archive_url=..., **env)`: an in-process app that takes callbacks."""

    def build(
        database: str = database_url, archive_url: str = f"s3://{bucket}/a", **extra: str
    ) -> Flask:
        return make_app(archive_url, database, **extra)

    return build


def queue(
    app: Flask, plivo: FakePlivo, recording_id: str, content: bytes, record_url: str | None = None
) -> dict[str, str]:
    """Finish a recording and deliver its signed callback (media at `record_url` if given)."""
    params = plivo.finish_recording(recording_id, content)
    if record_url is not None:
        params["record_url"] = record_url
    response = post_callback(app.test_client(), plivo, params)
    assert response.status_code == 200, response.get_json()
    return params


# --- a media host that trickles -----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How to answer one media request: `fast` bytes at once, the rest at `rate` bytes/s.

    `fast=None` sends everything at once; `rate=0` holds the rest back until the test ends.
    """

    fast: int | None = None
    rate: float = 0.0


@dataclass
class Served:
    """One media request as the host saw it."""

    recording_id: str
    peer_port: int
    started: float
    sent: int = 0
    finished: bool = False


@dataclass
class MediaHost:
    """A media host on 127.0.0.1 whose answers follow per-recording plans (the fake Plivo's
    media has no throttle: a kill "mid-upload" needs a download that is still going on)."""

    content: dict[str, bytes] = field(default_factory=dict)
    plans: dict[str, list[Plan]] = field(default_factory=dict)
    default: Plan = field(default_factory=Plan)
    served: list[Served] = field(default_factory=list)
    hold_group: int | None = None
    held: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    def url(self, recording_id: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/media/{recording_id}.mp3"

    def requests_for(self, recording_id: str) -> list[Served]:
        with self.lock:
            return [s for s in self.served if s.recording_id == recording_id]

    def hold_next_request_of(self, process: Process) -> None:
        """Hold back the next download that process (group) makes, so it can be killed in it."""
        with self.lock:
            self.hold_group = process.popen.pid

    def plan_for(self, recording_id: str, peer_port: int) -> Plan:
        with self.lock:
            queued = self.plans.get(recording_id)
            plan = queued.pop(0) if queued else self.default
            group = self.hold_group
        if group is not None and process_group_of(peer_port, self.port) == group:
            with self.lock:
                self.hold_group = None
            return Plan(fast=64 * 1024, rate=0)
        return plan


def process_group_of(peer_port: int, server_port: int) -> int | None:
    """The process group holding the client end of 127.0.0.1:peer_port → :server_port (Linux)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.rsplit(":", 1)[1], 16) == peer_port and (
            int(remote.rsplit(":", 1)[1], 16) == server_port
        ):
            inode = fields[9]
            break
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and inode in socket_inodes(int(entry.name)):
            with suppress(OSError):
                return os.getpgid(int(entry.name))
    return None


class _MediaHandler(BaseHTTPRequestHandler):
    host: MediaHost
    timeout = 10

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        recording_id = name.removesuffix(".mp3")
        content = self.host.content.get(recording_id)
        served = Served(recording_id, self.client_address[1], time.time())
        with self.host.lock:
            self.host.served.append(served)
        if content is None:
            self.send_error(404)
            return
        plan = self.host.plan_for(recording_id, self.client_address[1])
        if plan.rate == 0 and plan.fast is not None:
            with self.host.lock:
                self.host.held.append(served)
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        fast = len(content) if plan.fast is None else min(plan.fast, len(content))
        try:
            for start in range(0, fast, MiB):
                self.wfile.write(content[start : min(start + MiB, fast)])
                served.sent = min(start + MiB, fast)
            if plan.rate == 0:
                if fast < len(content):
                    self.host.stopping.wait()
                    return
            else:
                step = max(1, int(plan.rate / 20))  # twenty writes a second
                for start in range(fast, len(content), step):
                    if self.host.stopping.wait(step / plan.rate):
                        return
                    self.wfile.write(content[start : start + step])
                    served.sent = min(start + step, len(content))
            served.finished = True
        except OSError:
            return  # the downloader is gone (killed, or gave up)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def media() -> Iterator[MediaHost]:
    host = MediaHost()
    handler = type("Handler", (_MediaHandler,), {"host": host})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    host.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield host
    host.stopping.set()
    server.shutdown()
    thread.join()
    server.server_close()


# --- 1-3: a worker killed or stopped mid-job ----------------------------------------------------


@pytest.mark.e2e
def test_worker_sigkilled_mid_upload_is_taken_over_after_its_lease_and_archived_once(
    web, env, processes, media, plivo, rows, s3, bucket
) -> None:
    versioned(s3, bucket)
    audio = mp3_bytes(40 * MiB)
    media.content["killed-upload"] = audio
    # A first part's worth and a little more at once, then a trickle: the first worker is
    # caught with part 1 in S3 and part 2 still downloading.
    media.plans["killed-upload"] = [Plan(fast=PART + MiB, rate=64 * 1024)]
    queue(web(), plivo, "killed-upload", audio, media.url("killed-upload"))
    worker_env = env(f"s3://{bucket}/a")

    first = processes.worker("worker-1", worker_env)
    # The worker that claims the recording names its key, under its own ARCHIVE_URL's prefix.
    wait_for(lambda: rows.recording("killed-upload").archive_key is not None, 30, "a key")
    key = str(rows.recording("killed-upload").archive_key)
    assert key.startswith("a/recordings/")
    wait_for(lambda: uploaded_parts(s3, bucket, key) >= 1, 60, "a part uploaded")
    kill(first)
    assert first.popen.wait(timeout=10) == -signal.SIGKILL

    # Nothing is archived, and the dead worker's upload is still open.
    row = rows.recording("killed-upload")
    assert row.status == Status.ARCHIVING
    assert row.attempts == 1
    assert row.archive_sha256 is None and row.archived_at is None
    assert len(open_uploads(s3, bucket, key)) == 1
    assert object_versions(s3, bucket, key) == []
    lease_expiry = row.next_attempt_at
    assert lease_expiry is not None

    processes.worker("worker-2", worker_env)
    wait_for(
        lambda: rows.status("killed-upload") in (Status.ARCHIVED, Status.FAILED),
        LEASE_SECONDS + 45,
        "archived by the second worker",
    )
    row = assert_archived_once(rows, s3, bucket, "killed-upload", audio)
    assert row.attempts == 2
    downloads = media.requests_for("killed-upload")
    assert len(downloads) == 2
    # The second worker waited for the dead one's lease to run out.
    assert downloads[1].started >= lease_expiry.timestamp() - 0.1


@pytest.mark.e2e
def test_worker_sigkilled_mid_download_is_taken_over_and_archived_once(
    web, env, processes, media, plivo, rows, s3, bucket
) -> None:
    versioned(s3, bucket)
    audio = mp3_bytes(20 * MiB)
    media.content["killed-download"] = audio
    media.plans["killed-download"] = [Plan(fast=MiB, rate=64 * 1024)]
    queue(web(), plivo, "killed-download", audio, media.url("killed-download"))
    worker_env = env(f"s3://{bucket}/a")

    first = processes.worker("worker-1", worker_env)
    downloads = wait_for(
        lambda: [s for s in media.requests_for("killed-download") if s.sent > MiB],
        30,
        "a download under way",
    )
    kill(first)
    assert first.popen.wait(timeout=10) == -signal.SIGKILL
    assert not downloads[0].finished

    row = rows.recording("killed-download")
    assert row.status == Status.ARCHIVING
    assert row.attempts == 1
    key = row.archive_key  # named by the worker when it claimed the recording
    assert key is not None and key.startswith("a/recordings/")
    # Less than one part was read: the upload had not begun.
    assert open_uploads(s3, bucket) == []
    assert object_versions(s3, bucket, str(key)) == []

    processes.worker("worker-2", worker_env)
    wait_for(
        lambda: rows.status("killed-download") in (Status.ARCHIVED, Status.FAILED),
        LEASE_SECONDS + 45,
        "archived by the second worker",
    )
    row = assert_archived_once(rows, s3, bucket, "killed-download", audio)
    assert row.attempts == 2
    assert len(media.requests_for("killed-download")) == 2


@pytest.mark.e2e
def test_sigterm_mid_upload_releases_the_job_uncounted_and_exits_promptly(
    web, env, processes, media, plivo, rows, s3, bucket
) -> None:
    versioned(s3, bucket)
    audio = mp3_bytes(24 * MiB)
    media.content["stopped-upload"] = audio
    # A slow but steady host: the rest of part 2 would take nearly a minute to arrive.
    media.plans["stopped-upload"] = [Plan(fast=PART + MiB, rate=128 * 1024)]
    queue(web(), plivo, "stopped-upload", audio, media.url("stopped-upload"))
    worker_env = env(f"s3://{bucket}/a")

    first = processes.worker("worker-1", worker_env)
    # The worker that claims the recording names its key.
    wait_for(lambda: rows.recording("stopped-upload").archive_key is not None, 30, "a key")
    key = str(rows.recording("stopped-upload").archive_key)
    wait_for(lambda: uploaded_parts(s3, bucket, key) >= 1, 60, "a part uploaded")
    assert rows.status("stopped-upload") == Status.ARCHIVING
    stopped_at = time.monotonic()
    kill(first, signal.SIGTERM)
    code = first.popen.wait(timeout=30)
    took = time.monotonic() - stopped_at
    assert code == 0, first.output()
    # Seconds, not the minutes the rest of part 2 would take to trickle in (the bound is loose
    # for a loaded machine).
    assert took < 10, f"the worker took {took:.1f} s to stop after SIGTERM"

    row = rows.recording("stopped-upload")
    assert row.status == Status.PENDING
    assert row.attempts == 0  # given back, not counted as a failed attempt
    assert row.lease_token is None
    assert row.last_error is None
    assert row.next_attempt_at is not None and row.next_attempt_at <= utcnow()
    assert open_uploads(s3, bucket) == []
    assert object_versions(s3, bucket, key) == []
    assert "released on shutdown" in first.output()

    processes.worker("worker-2", worker_env)
    wait_for(
        lambda: rows.status("stopped-upload") in (Status.ARCHIVED, Status.FAILED),
        45,
        "archived by the next worker",
    )
    row = assert_archived_once(rows, s3, bucket, "stopped-upload", audio)
    assert row.attempts == 1


def test_stop_is_noticed_within_a_small_chunk_while_a_part_trickles_in() -> None:
    # The transfer manager asks for a whole 16 MiB part in one read(); a slow host must not make
    # SIGTERM wait for all of it (the test above, at process level).
    given = 0
    stop = threading.Event()

    def trickle(size: int) -> bytes:
        nonlocal given
        given += size
        if given >= 256 * 1024:
            stop.set()  # SIGTERM arrives while part 2 is still coming in
        return b"x" * size

    reader = HashingReader(trickle, interrupted=stop.is_set)
    with pytest.raises(Interrupted):
        reader.read(PART)
    assert given < MiB


# --- 4: several workers, one killed ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.postgres
@several_workers_need_postgres
def test_three_workers_one_sigkilled_archive_every_recording_exactly_once(
    web, env, processes, media, plivo, rows, s3, bucket
) -> None:
    versioned(s3, bucket)
    audio = {f"many-{n:02d}": mp3_bytes(256 * 1024 + n) for n in range(30)}
    media.content.update(audio)
    media.default = Plan(fast=0, rate=512 * 1024)  # about half a second a recording
    app = web()
    for recording_id, content in audio.items():
        queue(app, plivo, recording_id, content, media.url(recording_id))
    worker_env = env(f"s3://{bucket}/a")
    workers = [processes.worker(f"worker-{n}", worker_env) for n in (1, 2, 3)]

    def archived() -> int:
        return rows.count(Recording, Recording.status == Status.ARCHIVED)

    wait_for(lambda: archived() >= 8, 60, "8 recordings archived")
    victim = workers[0]
    media.hold_next_request_of(victim)
    held = wait_for(lambda: list(media.held), 30, "the first worker caught mid-download")[0]
    kill(victim)
    assert victim.popen.wait(timeout=10) == -signal.SIGKILL
    assert rows.status(held.recording_id) == Status.ARCHIVING

    wait_for(
        lambda: rows.count(Recording, Recording.status.in_([Status.ARCHIVED, Status.FAILED])) == 30,
        60,
        "all 30 settled",
        interval=0.2,
    )
    assert rows.count(Recording) == 30
    for recording_id, content in audio.items():
        row = assert_archived_once(rows, s3, bucket, recording_id, content)
        taken_over = recording_id == held.recording_id
        assert row.attempts == (2 if taken_over else 1), recording_id
        assert len(media.requests_for(recording_id)) == (2 if taken_over else 1), recording_id
    assert open_uploads(s3, bucket) == []
    for survivor in workers[1:]:
        assert survivor.running, survivor.output()
        assert "Traceback" not in survivor.output()


# --- 5: S3 down ---------------------------------------------------------------------------------


class MotoServer:
    """moto's S3 in this process, on a port of its own, that a test can stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture
def own_moto(s3_endpoint: str) -> Iterator[MotoServer]:
    """A moto server apart from the session's (which the other tests need up)."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.e2e
def test_s3_down_is_retried_with_the_error_visible_then_archived_once_it_is_back(
    web, env, processes, plivo, rows, own_moto
) -> None:
    s3 = boto3.client("s3", endpoint_url=own_moto.endpoint)
    bucket = versioned(s3, make_bucket(own_moto.endpoint))
    audio = mp3_bytes(2 * MiB)
    queue(web(archive_url=f"s3://{bucket}/a"), plivo, "s3-down", audio)
    # Down before the worker ever connects: a stopped moto would go on answering on keep-alive
    # connections it had already accepted.
    own_moto.stop()
    worker = processes.worker(
        "worker",
        env(
            f"s3://{bucket}/a",
            AWS_ENDPOINT_URL=own_moto.endpoint,
            ARCHIVE_MAX_ATTEMPTS="20",
        ),
    )

    def failed_attempt() -> Recording | None:
        row = rows.recording("s3-down")
        return row if row.status == Status.PENDING and row.last_error else None

    row = wait_for(failed_attempt, 60, "an attempt failed on S3")
    assert row.attempts >= 1
    assert "S3" in str(row.last_error) and "Could not connect" in str(row.last_error)
    assert row.next_attempt_at is not None and row.next_attempt_at > row.updated_at
    assert row.archive_sha256 is None
    assert worker.running

    # moto keeps its state in this process's backends, not in the server: one started again on
    # the same port still has the bucket. Were it gone (a moto in a process of its own), the
    # bucket would have to be made again here.
    own_moto.start()
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    wait_for(
        lambda: rows.status("s3-down") in (Status.ARCHIVED, Status.FAILED),
        60,
        "archived once S3 is back",
    )
    row = assert_archived_once(rows, s3, bucket, "s3-down", audio)
    assert row.attempts >= 2
    assert worker.running
    assert "Traceback" not in worker.output()


# --- 6: the database down -----------------------------------------------------------------------


class TcpProxy:
    """127.0.0.1:port → PostgreSQL; `close()` refuses connections and cuts the open ones,
    `open()` serves again on the same port. The machine's PostgreSQL itself stays up.

    `black_hole()` is a silent partition: connections stay open and new ones are accepted, but
    nothing is forwarded either way and nothing is closed; `restore()` forwards again."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._holing = threading.Event()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._closing.clear()
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()

    def close(self) -> None:
        self._closing.set()
        if self._accepting is not None:
            self._accepting.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            cut, self._sockets = self._sockets, set()
        for sock in cut:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def black_hole(self) -> None:
        self._holing.set()

    def restore(self) -> None:
        self._holing.clear()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            if self._holing.is_set():
                # Accepted (the kernel completes the handshake anyway), never answered.
                with self._lock:
                    self._sockets.add(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        other = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in other:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select(timeout=0.5):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        if self._holing.is_set():
                            continue  # lost on the way, and nobody is told
                        other[key.fileobj].sendall(data)  # type: ignore[index]
            except (OSError, ValueError):
                return  # cut by close()
            finally:
                with self._lock:
                    self._sockets.difference_update(other)
                for sock in other:
                    with suppress(OSError):
                        sock.close()


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    url = sa.make_url(database_url)
    proxy = TcpProxy(url.port or 5432)
    proxy.open()
    yield proxy
    proxy.close()


def through(proxy: TcpProxy, database_url: str) -> str:
    return sa.make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)


@pytest.mark.postgres
@outage_needs_postgres
def test_callback_answers_503_while_the_database_refuses_and_200_once_it_is_back(
    web, plivo, rows, proxy, database_url
) -> None:
    app = web(database=through(proxy, database_url))  # the same app object throughout
    client = app.test_client()
    # A first callback fills the pool with connections that the outage will cut.
    assert post_callback(client, plivo, plivo.finish_recording("db-warm", b"a")).status_code == 200

    proxy.close()
    params = plivo.finish_recording("db-down", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    for _ in range(3):  # Plivo's retry, and more: never a 200 while nothing can be committed
        response = client.post("/plivo/recording", data=params, headers=headers)
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["error"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.get_json()["checks"]["database"].startswith("unavailable")
    nonce = headers["X-Plivo-Signature-V3-Nonce"]
    assert rows.count(Recording, Recording.recording_id == "db-down") == 0
    assert rows.count(CallbackLog, CallbackLog.nonce == nonce) == 0

    proxy.open()
    # The very same signed request: its nonce was never committed, so it is not a replay.
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "accepted"
    assert rows.status("db-down") == Status.PENDING
    assert rows.count(Recording, Recording.recording_id == "db-down") == 1
    assert client.get("/healthz").status_code in (200, 503)  # the archive is not this test's


@pytest.mark.postgres
@outage_needs_postgres
def test_a_statement_run_through_psycopg_itself_fails_as_sqlalchemys_and_recovers(
    database_url: str,
) -> None:
    """execute_autocommitted (the callback's one statement): a connection the server dropped
    comes out as SQLAlchemy's OperationalError, is invalidated, and the next call reconnects;
    a constraint violation is SQLAlchemy's IntegrityError and leaves nothing behind."""
    engine = make_engine(database_url, pool_size=1)
    try:
        pid = execute_autocommitted(engine, "SELECT pg_backend_pid()", {})[0]
        killer = make_engine(database_url)
        with killer.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        killer.dispose()
        with pytest.raises(sa.exc.OperationalError) as dropped:
            execute_autocommitted(engine, "SELECT pg_backend_pid()", {})
        assert dropped.value.connection_invalidated
        assert execute_autocommitted(engine, "SELECT pg_backend_pid()", {})[0] != pid

        insert = "INSERT INTO schedules (name, next_run_at) VALUES (%(name)s, now()) RETURNING name"
        assert execute_autocommitted(engine, insert, {"name": "once"}) == ("once",)
        with pytest.raises(sa.exc.IntegrityError):
            execute_autocommitted(engine, insert, {"name": "once"})
        # Autocommitted: the first row stays, the connection is usable and out of any transaction.
        (count,) = execute_autocommitted(engine, "SELECT count(*) FROM schedules", {})
        assert count == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
@outage_needs_postgres
def test_each_new_connection_has_the_statement_timeout_and_keeps_transactions(
    database_url: str,
) -> None:
    """A connection is opened with statement_timeout set, in one round trip outside any
    transaction; what a session then does is still one transaction, which a rollback undoes."""
    engine = make_engine(database_url, timeout=3, pool_size=2)
    try:
        with engine.connect() as first, engine.connect() as second:
            for connection in (first, second):
                assert connection.execute(sa.text("SHOW statement_timeout")).scalar() == "3s"
                assert connection.connection.driver_connection.autocommit is False
            first.execute(sa.text("INSERT INTO schedules (name, next_run_at) VALUES ('x', now())"))
            assert second.execute(sa.text("SELECT count(*) FROM schedules")).scalar() == 0
            first.rollback()
        assert execute_autocommitted(engine, "SELECT count(*) FROM schedules", {}) == (0,)
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
            execute_autocommitted(engine, "SELECT pg_sleep(4)", {})
    finally:
        engine.dispose()


PARTITION_TIMEOUT = 2  # DATABASE_TIMEOUT_SECONDS in the partition tests
PROMPT_503 = 2 * PARTITION_TIMEOUT + 3  # a pooled connection's ping, then a new connection


@pytest.mark.postgres
@outage_needs_postgres
def test_silent_database_partition_answers_503_within_seconds_and_recovers(
    web, plivo, rows, proxy, database_url
) -> None:
    app = web(
        database=through(proxy, database_url), DATABASE_TIMEOUT_SECONDS=str(PARTITION_TIMEOUT)
    )
    client = app.test_client()
    # The pool holds connections that the partition will leave open and silent.
    assert (
        post_callback(client, plivo, plivo.finish_recording("hole-warm", b"a")).status_code == 200
    )
    assert client.get("/healthz").get_json()["checks"]["database"] == "ok"

    proxy.black_hole()
    params = plivo.finish_recording("hole-during", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    took = []
    for _ in range(3):
        began = time.monotonic()
        response = client.post("/plivo/recording", data=params, headers=headers)
        took.append(time.monotonic() - began)
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["error"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        began = time.monotonic()
        health = client.get("/healthz")
        took.append(time.monotonic() - began)
        assert health.status_code == 503
        assert health.get_json()["checks"]["database"].startswith("unavailable")
    print("answered in", [f"{t:.2f} s" for t in took])
    assert max(took) < PROMPT_503, took

    proxy.restore()
    # The very same signed request: its nonce was never committed, so it is not a replay.
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "accepted"
    assert rows.status("hole-during") == Status.PENDING
    assert rows.count(Recording, Recording.recording_id == "hole-during") == 1
    assert client.get("/healthz").get_json()["checks"]["database"] == "ok"


@pytest.mark.e2e
@pytest.mark.postgres
@outage_needs_postgres
def test_worker_notices_a_silent_database_partition_and_archives_once_it_is_back(
    web, env, processes, plivo, rows, proxy, database_url, s3, bucket
) -> None:
    versioned(s3, bucket)
    app = web()  # the callbacks reach the database directly; only the worker's path is silenced
    worker = processes.worker(
        "worker",
        env(
            f"s3://{bucket}/a",
            DATABASE_URL=through(proxy, database_url),
            DATABASE_TIMEOUT_SECONDS=str(PARTITION_TIMEOUT),
        ),
    )
    before = mp3_bytes(100_000)
    queue(app, plivo, "hole-before", before)
    wait_for(lambda: rows.status("hole-before") == Status.ARCHIVED, 30, "archived before")

    proxy.black_hole()
    began = time.monotonic()
    during = mp3_bytes(100_000)
    queue(app, plivo, "hole-during", during)
    wait_for(lambda: "database unavailable" in worker.output(), 20, "the partition noticed")
    noticed = time.monotonic() - began
    assert noticed < PROMPT_503 + 2, noticed  # the worker polls once a second
    assert worker.running
    assert rows.status("hole-during") == Status.PENDING

    proxy.restore()
    wait_for(
        lambda: rows.status("hole-during") in (Status.ARCHIVED, Status.FAILED),
        45,
        "archived once the network is back",
    )
    assert_archived_once(rows, s3, bucket, "hole-during", during)
    assert worker.running
    assert "Traceback" not in worker.output()


@pytest.mark.e2e
@pytest.mark.postgres
@outage_needs_postgres
def test_worker_rides_out_a_database_outage_and_archives_once_it_is_back(
    web, env, processes, plivo, rows, proxy, database_url, s3, bucket
) -> None:
    versioned(s3, bucket)
    app = web()  # the callbacks reach the database directly; only the worker's path is cut
    worker = processes.worker(
        "worker", env(f"s3://{bucket}/a", DATABASE_URL=through(proxy, database_url))
    )
    before = mp3_bytes(100_000)
    queue(app, plivo, "db-before", before)
    wait_for(lambda: rows.status("db-before") == Status.ARCHIVED, 30, "archived before")

    proxy.close()
    during = mp3_bytes(3 * MiB)
    queue(app, plivo, "db-during", during)
    wait_for(lambda: "database unavailable" in worker.output(), 20, "the outage noticed")
    assert worker.running
    assert rows.status("db-during") == Status.PENDING
    assert rows.recording("db-during").attempts == 0

    proxy.open()
    wait_for(
        lambda: rows.status("db-during") in (Status.ARCHIVED, Status.FAILED),
        45,
        "archived once the database is back",
    )
    assert_archived_once(rows, s3, bucket, "db-before", before)
    row = assert_archived_once(rows, s3, bucket, "db-during", during)
    assert row.attempts == 1
    assert worker.running
    assert "Traceback" not in worker.output()


# --- 7: media host faults through a worker process ---------------------------------------------

# A read timeout of a second (MEDIA_READ_TIMEOUT_SECONDS), so that a stall "past the read timeout"
# costs seconds.
READ_TIMEOUT = 1


@pytest.mark.e2e
def test_media_host_faults_end_archived_or_failed_with_the_reason(
    web, env, processes, media, plivo, rows, s3, bucket
) -> None:
    versioned(s3, bucket)
    app = web()
    audio = {
        name: mp3_bytes(200_000) for name in ("not-yet", "stalls", "moved", "forged", "broken")
    }
    plivo.stall_seconds = READ_TIMEOUT + 2
    plivo.media_faults.update(
        {
            "not-yet": ["404", "404"],
            "stalls": ["stall"],
            # Another server on an allowed host (127.0.0.1, another port).
            "moved": [f"redirect:{media.url('moved')}"],
            # `localhost` is this machine too, but not listed in RECORDING_HOSTS.
            "forged": [f"redirect:{media.url('forged', host='localhost')}"],
            "broken": ["500"] * 10,
        }
    )
    media.content.update({"moved": audio["moved"], "forged": audio["forged"]})
    for recording_id, content in audio.items():
        queue(app, plivo, recording_id, content)
    worker = processes.worker(
        "worker",
        env(
            f"s3://{bucket}/a",
            ARCHIVE_MAX_ATTEMPTS="5",
            MEDIA_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT),
        ),
    )

    def settled() -> bool:
        return all(rows.status(r) in (Status.ARCHIVED, Status.FAILED) for r in audio)

    wait_for(settled, 60, "every recording archived or failed", interval=0.2)
    fetched = [path for path, _auth in plivo.media_requests]

    row = assert_archived_once(rows, s3, bucket, "not-yet", audio["not-yet"])
    assert row.attempts == 3
    assert fetched.count("/media/not-yet.mp3") == 3

    row = assert_archived_once(rows, s3, bucket, "stalls", audio["stalls"])
    assert row.attempts == 2
    stalled = [line for line in worker.output().splitlines() if '"stalls"' in line]
    assert any("timed out" in line for line in stalled), stalled

    row = assert_archived_once(rows, s3, bucket, "moved", audio["moved"])
    assert row.attempts == 1
    assert len(media.requests_for("moved")) == 1

    row = rows.recording("forged")
    assert row.status == Status.FAILED
    assert row.attempts == 1
    assert row.last_error is not None and row.last_error.startswith("refused:")
    assert "localhost" in row.last_error and "RECORDING_HOSTS" in row.last_error
    assert media.requests_for("forged") == []  # no request reached the other host
    assert row.archive_sha256 is None

    row = rows.recording("broken")
    assert row.status == Status.FAILED
    assert row.attempts == 5
    assert row.last_error is not None and "500" in row.last_error
    assert fetched.count("/media/broken.mp3") == 5
    # Backoff: the waits after attempts 1 to 4 are at least half of 1, 2, 4 and 8 s.
    assert row.updated_at - row.created_at >= dt.timedelta(seconds=0.5 + 1 + 2 + 4)
    for recording_id in ("forged", "broken"):
        key = rows.recording(recording_id).archive_key
        assert object_versions(s3, bucket, str(key)) == []
    assert open_uploads(s3, bucket) == []


# --- 8: replays and garbage through gunicorn ----------------------------------------------------


@pytest.mark.e2e
def test_replays_and_garbage_through_gunicorn(
    web, env, processes, plivo, rows, bucket, s3_endpoint
) -> None:
    port = free_port()
    web_env = env(f"s3://{bucket}/a", PORT=str(port), WEB_CONCURRENCY="2")
    gunicorn = processes.start("web", PROCFILE["web"], web_env)
    base = f"http://127.0.0.1:{port}"
    Deployment(base, [gunicorn]).wait_until_healthy(timeout=60)
    callback_url = base + "/plivo/recording"

    def deliver(params: dict[str, str], headers: dict[str, str]) -> requests.Response:
        return requests.post(callback_url, data=params, headers=headers, timeout=HTTP_TIMEOUT)

    # --- the same signed callback again, same nonce: a replay ---------------------------------
    first_params = plivo.finish_recording("replayed", b"audio")
    first_headers = plivo.sign_request("POST", CALLBACK_URL, first_params)
    answer = deliver(first_params, first_headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "accepted"
    again = deliver(first_params, first_headers)
    assert again.status_code == 403, again.text
    assert again.json()["error"] == "replayed_nonce"
    assert rows.count(Recording, Recording.recording_id == "replayed") == 1

    # --- 20 identical requests at once: one is accepted, 19 are replays -----------------------
    race_params = plivo.finish_recording("raced", b"audio")
    race_headers = plivo.sign_request("POST", CALLBACK_URL, race_params)
    barrier = threading.Barrier(20)
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def race() -> None:
        barrier.wait(timeout=10)
        response = deliver(race_params, race_headers)
        with lock:
            answers.append((response.status_code, response.json().get("error", "")))

    threads = [threading.Thread(target=race) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers) == [(200, "")] + [(403, "replayed_nonce")] * 19, answers
    assert rows.count(Recording, Recording.recording_id == "raced") == 1
    assert rows.count(CallbackLog, CallbackLog.recording_id == "raced") == 1

    # --- a body of 1 MiB ----------------------------------------------------------------------
    big_params = {**plivo.finish_recording("too-big", b"audio"), "padding": "x" * MiB}
    big = deliver(big_params, plivo.sign_request("POST", CALLBACK_URL, big_params))
    assert big.status_code == 413, big.text[:300]
    assert big.json()["error"] == "request_entity_too_large"

    # --- garbage: answered 4xx with the JSON error shape, never 5xx, nothing stored -----------
    signed = plivo.sign_request("POST", CALLBACK_URL, {"recording_id": "junk"})
    garbage: list[tuple[bytes, dict[str, str]]] = [
        (os.urandom(4096), {"Content-Type": "application/x-www-form-urlencoded", **signed}),
        (b"%zz%%=&&==\xff\xfe", {"Content-Type": "application/x-www-form-urlencoded", **signed}),
        (b'{"recording_id": "junk"}', {"Content-Type": "application/json", **signed}),
        (b"recording_id=junk", {"Content-Type": "application/x-www-form-urlencoded"}),
    ]
    for body, headers in garbage:
        response = requests.post(callback_url, data=body, headers=headers, timeout=HTTP_TIMEOUT)
        assert 400 <= response.status_code < 500, (body[:40], response.status_code, response.text)
        assert set(response.json()) == {"error", "message"}
    assert rows.count(Recording, Recording.recording_id.in_(["too-big", "junk"])) == 0
    assert rows.count(CallbackLog, CallbackLog.recording_id.in_(["too-big", "junk"])) == 0

    # --- a chunked body over the limit: 413, as with a Content-Length ------------------------
    def chunks() -> Iterator[bytes]:
        yield b"recording_id=too-big-chunked&record_url=x&padding="
        for _ in range(16):
            yield b"x" * (64 * 1024)

    chunked = requests.post(
        callback_url,
        data=chunks(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **signed},
        timeout=HTTP_TIMEOUT,
    )
    assert chunked.status_code == 413, chunked.text[:300]
    assert chunked.json()["error"] == "request_entity_too_large"

    # --- HEAD with a GET signature and an unsigned body: not a callback ----------------------
    signed_query = plivo.finish_recording("head-planted", b"audio")
    head_headers = plivo.sign_request("GET", CALLBACK_URL, signed_query)
    head = requests.head(
        callback_url,
        params=signed_query,
        data={"record_url": "https://media.plivo.com/evil.mp3", "conference_name": "planted"},
        headers=head_headers,
        timeout=HTTP_TIMEOUT,
    )
    assert head.status_code == 405
    assert rows.count(Recording, Recording.recording_id == "head-planted") == 0
    assert rows.count(CallbackLog, CallbackLog.nonce == head_headers[NONCE_HEADER]) == 0

    # --- a nonce stays refused as long as the log keeps its request: nothing prunes nonces and
    # the log cannot be emptied (tests/test_migrations.py); after a worker has run, the first
    # callback is still a replay ------------------------------------------------------------
    old_nonce = first_headers[NONCE_HEADER]
    with rows.sessions() as session:
        logged_request = session.scalars(
            select(CallbackLog).where(CallbackLog.nonce == old_nonce)
        ).one()
    assert logged_request.headers[NONCE_HEADER] == old_nonce  # readable by anyone with the log
    Worker(services(web())).run(once=True)
    late = deliver(first_params, first_headers)
    assert late.status_code == 403, late.text
    assert late.json()["error"] == "replayed_nonce"
    assert rows.count(Recording, Recording.recording_id == "replayed") == 1
    assert rows.count(CallbackLog, CallbackLog.recording_id == "replayed") == 1
    assert gunicorn.running
    assert "Traceback" not in gunicorn.output()


# --- hostile media hosts and poison jobs through a worker process -------------------------------


class _HostileHandler(BaseHTTPRequestHandler):
    """Media answers an attacker (or a broken host) would give, one per file name."""

    stopping: threading.Event
    arrived: list[str]
    protocol_version = "HTTP/1.0"  # close-delimited bodies: an endless one needs no length
    timeout = 30

    def do_GET(self) -> None:
        kind = self.path.rsplit("/", 1)[-1].split("-", 1)[0].removesuffix(".mp3")
        self.arrived.append(kind)
        try:
            getattr(self, f"_{kind}")()
        except OSError:
            return  # the worker hung up, as it should

    def _head(self, content_type: str = "audio/mpeg", length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _good(self) -> None:
        body = MP3_TAG + b"good audio"
        self._head(length=len(body))
        self.wfile.write(body)

    def _trickle(self) -> None:
        # A byte every half second: never long enough between bytes for the read timeout
        # (1 s here, as one byte every 5 s is against the default minute).
        self._head(length=100_000)
        self.wfile.write(MP3_TAG)
        while not self.stopping.wait(0.5):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def _hold(self) -> None:
        self._head(length=100_000)
        self.wfile.write(MP3_TAG + b"\0" * 6)
        self.wfile.flush()
        self.stopping.wait()

    def _slow(self) -> None:
        # Steady at 40 KB/s, above the minimum rate, but 400 KB take ten seconds.
        self._head(length=len(MP3_TAG) + 400_000)
        self.wfile.write(MP3_TAG)
        for _ in range(200):
            if self.stopping.wait(0.05):
                return
            self.wfile.write(b"\0" * 2000)

    def _endless(self) -> None:
        self._head()
        self.wfile.write(MP3_TAG)
        chunk = b"\0" * (256 * 1024)
        while not self.stopping.is_set():
            self.wfile.write(chunk)

    def _huge(self) -> None:
        self._head(length=10 * 1024**3)
        self.wfile.write(MP3_TAG + b"\0" * 1000)

    def _html(self) -> None:
        body = b"<html><body>502 Bad Gateway</body></html>"
        self._head("text/html; charset=utf-8", len(body))
        self.wfile.write(body)

    def _octet(self) -> None:
        body = b"<html><body>Access denied</body></html>"
        self._head("application/octet-stream", len(body))
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@dataclass
class HostileHost:
    port: int
    arrived: list[str]

    def url(self, recording_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/media/{recording_id}.mp3"


@pytest.fixture
def hostile() -> Iterator[HostileHost]:
    stopping = threading.Event()
    arrived: list[str] = []
    handler = type("Handler", (_HostileHandler,), {"stopping": stopping, "arrived": arrived})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield HostileHost(int(server.server_address[1]), arrived)
    stopping.set()
    server.shutdown()
    thread.join()
    server.server_close()


def queue_at(
    app: Flask, plivo: FakePlivo, recording_id: str, record_url: str, duration_ms: int | None
) -> None:
    """Deliver a recording's signed callback naming `record_url`; without `duration_ms`, a
    Conference XML callback without durations, and Plivo's Recording API knows none either."""
    params = plivo.finish_recording(recording_id, b"", duration_ms=duration_ms or 5000)
    if duration_ms is None:
        params = {
            "RecordUrl": record_url,
            "RecordingID": recording_id,
            "ConferenceName": params["conference_name"],
            "RecordingStartMs": params["recording_start_ms"],
        }
        plivo.recordings[recording_id]["recording_duration_ms"] = None
        plivo.recordings[recording_id]["recording_end_ms"] = None
    else:
        params["record_url"] = record_url
    response = post_callback(app.test_client(), plivo, params)
    assert response.status_code == 200, response.get_json()


# Small bounds, so that each hostile answer costs a second or two.
HOSTILE_MEDIA_ENV = {
    "MEDIA_READ_TIMEOUT_SECONDS": "1",
    "MEDIA_MIN_BYTES_PER_SECOND": "10000",
    "MEDIA_DEADLINE_SECONDS": "4",
    "MEDIA_MAX_BYTES": str(12 * MiB),
    "ARCHIVE_MAX_ATTEMPTS": "1",
}


@pytest.mark.e2e
def test_hostile_media_fails_each_job_with_its_reason_and_the_queue_moves_on(
    web, env, processes, hostile, plivo, rows, s3, bucket
) -> None:
    versioned(s3, bucket)
    app = web()
    jobs = {
        "trickle": 5000,
        "slow": 20_000,
        # Two minutes of mp3 may be 10.6 MB here: more than a part, so a multipart upload starts.
        "endless": 120_000,
        "endless-unknown": None,  # no duration anywhere: MEDIA_MAX_BYTES (12 MiB) applies
        "huge": 5000,
        "html": 5000,
        "octet": 5000,
        "good": 5000,
    }
    for recording_id, duration_ms in jobs.items():
        queue_at(app, plivo, recording_id, hostile.url(recording_id), duration_ms)
    started = time.monotonic()
    worker = processes.worker("worker", env(f"s3://{bucket}/a", **HOSTILE_MEDIA_ENV))

    wait_for(
        lambda: all(rows.status(r) in (Status.ARCHIVED, Status.FAILED) for r in jobs),
        40,
        "every job settled",
        interval=0.2,
    )
    took = time.monotonic() - started
    assert worker.running, worker.output()

    def reason(recording_id: str) -> str:
        row = rows.recording(recording_id)
        assert row.status == Status.FAILED, (recording_id, row.last_error)
        assert row.archive_sha256 is None and row.archived_at is None
        assert object_versions(s3, bucket, str(row.archive_key)) == []
        return row.last_error or ""

    assert "too slow" in reason("trickle")
    assert "MEDIA_DEADLINE_SECONDS" in reason("slow")
    for endless in ("endless", "endless-unknown"):
        assert reason(endless).startswith("refused: media host sent more than")
    assert "more than 12582912 bytes (MEDIA_MAX_BYTES" in reason("endless-unknown")
    assert "(the most 120 s of mp3 can take)" in reason("endless")
    assert reason("huge").startswith("refused: media host announced 10737418240 bytes")
    assert reason("html").startswith("refused: media host sent Content-Type text/html")
    assert "not mp3 audio" in reason("octet")
    assert open_uploads(s3, bucket) == []
    assert_archived_once(rows, s3, bucket, "good", MP3_TAG + b"good audio")
    # Bounded by the settings, not by the hosts' patience (about 1 + 4 + a few s of work).
    assert took < 25, f"the queue took {took:.1f} s"


@pytest.mark.e2e
def test_sigterm_stops_the_worker_promptly_while_a_media_read_is_stalled(
    web, env, processes, hostile, plivo, rows, bucket
) -> None:
    queue_at(web(), plivo, "hold", hostile.url("hold"), 5000)
    # The default bounds: a read timeout of a minute, so only the stop itself can end the read.
    worker = processes.worker("worker", env(f"s3://{bucket}/a"))
    wait_for(lambda: "hold" in hostile.arrived, 30, "the download started")
    time.sleep(0.5)  # well inside the blocked read

    stopped_at = time.monotonic()
    kill(worker, signal.SIGTERM)
    code = worker.popen.wait(timeout=70)
    took = time.monotonic() - stopped_at

    assert code == 0, worker.output()
    assert took < 3, f"the worker took {took:.1f} s to stop after SIGTERM"
    row = rows.recording("hold")
    assert row.status == Status.PENDING
    assert row.attempts == 0
    assert row.lease_token is None
    assert "released on shutdown" in worker.output()


@pytest.mark.e2e
def test_poison_jobs_fail_with_their_reason_and_the_worker_goes_on(
    web, env, processes, media, plivo, rows, bucket
) -> None:
    app = web()
    # A wildcard entry lets through a name the resolver cannot even encode.
    queue(app, plivo, "bad-host", MP3_TAG, "https://a..plivo.com/x.mp3")
    # Durations Plivo's Recording API reports for callbacks that carried none.
    for recording_id, duration in (("inf-duration", "1e400"), ("huge-duration", "1e30")):
        queue_at(app, plivo, recording_id, media.url(recording_id), None)
        plivo.recordings[recording_id]["recording_duration_ms"] = duration
    media.content["after"] = MP3_TAG + b"after the poison"
    queue(app, plivo, "after", media.content["after"], media.url("after"))
    worker = processes.worker(
        "worker", env(f"s3://{bucket}/a", RECORDING_HOSTS="127.0.0.1,*.plivo.com")
    )

    wait_for(
        lambda: rows.status("after") in (Status.ARCHIVED, Status.FAILED) or not worker.running,
        30,
        "the job after the poison settled",
        interval=0.2,
    )
    assert worker.running, worker.output()
    assert rows.status("after") == Status.ARCHIVED
    bad_host = rows.recording("bad-host")
    assert bad_host.status == Status.FAILED
    assert "a..plivo.com" in (bad_host.last_error or "")
    assert "not a valid host name" in (bad_host.last_error or "")
    for recording_id in ("inf-duration", "huge-duration"):
        row = rows.recording(recording_id)
        assert row.status == Status.FAILED, (recording_id, row.last_error)
        assert "recording_duration_ms" in (row.last_error or "")
        assert row.duration_ms is None
    assert media.requests_for("inf-duration") == []
