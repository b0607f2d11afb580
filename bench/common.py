"""What the benchmarks share: processes (gunicorn, moto, the media server), free ports, a
throw-away PostgreSQL database, signed callbacks, generated media, percentiles, peak memory, and
the report (a short human table plus one final JSON line). The load generator is in
`loadgen.py`, the bulk data set in `dataset.py`.

Nothing heavy is imported at the top: `servers.py` imports this module too and should start fast.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import functools
import hashlib
import hmac
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BIN = Path(sys.executable).parent  # the virtualenv's bin: gunicorn, webhook, moto_server
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
PLIVO_AUTH_ID = "MABENCHAUTHID"
PLIVO_AUTH_TOKEN = "bench-auth-token"  # noqa: S105 - a made-up token for a local benchmark
CALLBACK_PATH = "/plivo/recording"
MIB = 1024 * 1024

# Variables the service, gunicorn, Flask or boto3 read: none may leak in from the caller's shell.
SERVICE_ENV_PREFIXES = ("AWS_", "PLIVO_", "FLASK_", "ARCHIVE_", "GUNICORN")
SERVICE_ENV_NAMES = {
    "DATABASE_URL",
    "PUBLIC_URL",
    "RECORDING_HOSTS",
    "RETENTION_DAYS",
    "OBJECT_LOCK_MODE",
    "MAX_CALLBACK_BYTES",
    "PRESIGN_SECONDS",
    "PORT",
    "WEB_CONCURRENCY",
    "PYTHONPATH",
}


# --- small things -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median_index(values: Sequence[float]) -> int:
    """Where the median of `values` is (the lower of the two middle ones for an even count): the
    round that stands for a run of rounds."""
    return sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of durations in seconds, as milliseconds rounded to 0.01."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p95": round(percentile(ms, 95), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2) if ms else math.nan,
    }


def default_workers() -> int:
    """gunicorn workers: WEB_CONCURRENCY as the platform sets it, else one per CPU."""
    raw = os.environ.get("WEB_CONCURRENCY", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else (os.cpu_count() or 1)


def admin_database_url() -> str:
    """Where to create the benchmark's own database (a maintenance database of the server)."""
    return (
        os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or DEFAULT_ADMIN_URL
    )


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        total_kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["mem_gib"] = round(total_kib / MIB, 1)
    info["code"] = code_version()
    return info


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the service's files differ from it (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "webhook", "migrations", "Procfile"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit or None, "uncommitted_changes": bool(changed)}


# --- generated media ----------------------------------------------------------------------------

MEDIA_BLOCK = MIB


# An empty ID3v2.4 tag: the worker archives only what begins as audio of the format does.
MP3_TAG = b"ID3\x04\x00\x00\x00\x00\x00\x00"


@functools.lru_cache(maxsize=64)
def _media_block(name: str, length: int) -> bytes:
    return (MP3_TAG + random.Random(name).randbytes(length))[:length]


def media_chunks(name: str, size: int, chunk: int = MEDIA_BLOCK) -> Iterator[memoryview]:
    """The bytes of a generated recording: a pseudo-random block seeded by `name`, repeated to
    `size` bytes, in chunks (so 1 GiB never sits in memory)."""
    block = memoryview(_media_block(name, min(size, MEDIA_BLOCK) or 1))
    sent = 0
    while sent < size:
        offset = sent % len(block)
        piece = block[offset : offset + min(chunk, size - sent)]
        yield piece
        sent += len(piece)


def media_sha256(name: str, size: int) -> str:
    """The SHA-256 of `media_chunks(name, size)`."""
    digest = hashlib.sha256()
    for chunk in media_chunks(name, size):
        digest.update(chunk)
    return digest.hexdigest()


def media_path(name: str, size: int, ext: str = "mp3") -> str:
    """The media server's path for a generated recording."""
    return f"/media/{size}/{name}.{ext}"


# --- memory -------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, ...), in KiB; {} once it is gone."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    return fields


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, same user or root); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, …, utime, stime…).

    The command name may hold spaces and parentheses: the fields follow its last ")"."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (gunicorn's workers under its master)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(entry.name)] = int(proc_stat(entry.name)[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return sorted(found)


def cpu_times(pids: Iterable[int]) -> dict[int, float]:
    """User plus system CPU each process has used so far, in seconds (left out once it is gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    times = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = proc_stat(pid)
            times[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return times


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two `cpu_times` (a process born in between counts from 0)."""
    return sum(spent - before.get(pid, 0.0) for pid, spent in after.items())


def postmaster_pid(url: str) -> int:
    """The process id of the PostgreSQL server that `url` reaches (the parent of a backend)."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(proc_stat(row[0])[1])


def postgres_pids(postmaster: int) -> list[int]:
    """That server's processes: the postmaster, and its backends and background processes."""
    return [postmaster, *descendants(postmaster)]


class CPUSampler(threading.Thread):
    """The CPU each process picked by `pids()` has used while something runs, sampled every
    `every` seconds: a process that ends before `stop` (a connection's backend, closed when its
    client went away) keeps what it had used at its last sample."""

    def __init__(self, pids: Callable[[], Iterable[int]], every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.every = every
        self.before = cpu_times(pids())
        self.latest: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            self.latest.update(cpu_times(self.pids()))

    def stop(self) -> float:
        """Stop sampling; the CPU seconds used since this sampler was made."""
        self._stop_event.set()
        self.join()
        self.latest.update(cpu_times(self.pids()))
        return cpu_used(self.before, self.latest)


class RSSSampler(threading.Thread):
    """Polls a process's VmRSS while something runs, keeping the largest and a few samples."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every = every
        self.peak_kib = 0
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while not self._stop_event.is_set():
            rss = proc_status(self.pid).get("VmRSS", 0)
            self.peak_kib = max(self.peak_kib, rss)
            self.samples.append((time.perf_counter() - started, rss))
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --- processes ----------------------------------------------------------------------------------


def die_with_parent() -> None:
    # In the child between fork and exec: if the benchmark is killed, its servers go too.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def service_env(home: Path, settings: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a process under test: nothing of the service's own settings from
    the caller's shell, a fresh HOME (gunicorn's control socket lives there), unbuffered output."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in SERVICE_ENV_NAMES and not key.startswith(SERVICE_ENV_PREFIXES)
    }
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env["HOME"] = str(home)
    env.update(settings or {})
    return env


class Service:
    """A long-running process in its own session, its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], logdir: Path, cwd: Path = REPO
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = logdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.pid = self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the whole process group, then SIGKILL it if it does not go in time."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace)
        # Anything left in the group (a worker the master lost track of) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.returncode


@dataclass
class Measured:
    """A process run to its end, with what the kernel says it used (wait4's rusage)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_kib: int
    user_s: float
    sys_s: float


def run_measured(
    argv: Sequence[str], env: dict[str, str], timeout: float, cwd: Path = REPO
) -> Measured:
    """Run a command to completion; its peak RSS (ru_maxrss) comes from wait4, so there is no
    race with polling /proc of a process that is about to exit."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        popen = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(popen.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - started
        popen.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(
            returncode=popen.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall_s=wall,
            maxrss_kib=usage.ru_maxrss,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
        )


def wait_http(
    url: str, timeout: float, service: Service | None = None, want: int | None = None
) -> int:
    """Poll `url` until it answers (with status `want`, if given); fail if `service` dies."""
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if service is not None and not service.running:
            raise RuntimeError(f"{service.name} exited while starting:\n{service.tail()}")
        try:
            response = requests.get(url, timeout=5)
            if want is None or response.status_code == want:
                return response.status_code
            last = f"{response.status_code} {response.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.05)
    tail = f"\n{service.tail()}" if service is not None else ""
    raise TimeoutError(f"{url} did not answer in {timeout} s: {last}{tail}")


def read_procfile() -> dict[str, str]:
    """The Procfile's process types and their commands."""
    commands = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and not line.lstrip().startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


def gunicorn_argv(port: int, app_spec: str | None = None) -> list[str]:
    """The Procfile's web command with $PORT filled in and bound to 127.0.0.1 (loopback only);
    `app_spec` replaces the app (the empty endpoint runs under exactly the same settings)."""
    argv = shlex.split(read_procfile()["web"].replace("$PORT", str(port)))
    if Path(argv[0]).name != "gunicorn":
        raise RuntimeError(f"the Procfile's web line does not start gunicorn: {argv}")
    argv[0] = str(BIN / "gunicorn")
    argv = [a.replace("0.0.0.0:", "127.0.0.1:") for a in argv]
    if app_spec is not None:
        if ":" not in argv[-1]:
            raise RuntimeError(f"cannot find the app in the Procfile's web line: {argv}")
        argv[-1] = app_spec
    return argv


def start_gunicorn(
    name: str,
    port: int,
    env: dict[str, str],
    logdir: Path,
    app_spec: str | None = None,
    ready_path: str = "/healthz",
    timeout: float = 60.0,
) -> Service:
    """gunicorn as the Procfile starts it; returns once `ready_path` answers."""
    service = Service(name, gunicorn_argv(port, app_spec), env, logdir)
    want = 200 if app_spec is None else None
    wait_http(f"http://127.0.0.1:{port}{ready_path}", timeout, service, want)
    return service


def gunicorn_workers(master: Service, expected: int, timeout: float = 30.0) -> list[int]:
    """The worker pids under a gunicorn master, once all `expected` have booted."""
    deadline = time.monotonic() + timeout
    while True:
        workers = descendants(master.pid)
        if len(workers) >= expected or time.monotonic() > deadline:
            return workers
        time.sleep(0.05)


def start_moto(logdir: Path) -> tuple[Service, str]:
    """moto's S3 as its own HTTP server process on 127.0.0.1."""
    port = free_port()
    service = Service(
        "moto",
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        service_env(logdir / "home-moto", AWS_ENV),
        logdir,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/", 60, service)
    return service, endpoint


def start_media(logdir: Path) -> tuple[Service, str]:
    """The generated-media server (`servers.py media`) as its own process."""
    port = free_port()
    service = Service(
        "media",
        [sys.executable, str(BENCH / "servers.py"), "media", "--port", str(port)],
        service_env(logdir / "home-media"),
        logdir,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/", 30, service)
    return service, base


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session(
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=endpoint)


# --- PostgreSQL ---------------------------------------------------------------------------------


@contextlib.contextmanager
def temp_database(tag: str, admin_url: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database with the service's migrations applied; dropped afterwards."""
    import sqlalchemy as sa

    name = f"bench_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url, _existed, engine = _migrated_database(name, admin_url)
    try:
        yield url
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@contextlib.contextmanager
def kept_database(name: str, admin_url: str | None = None) -> Iterator[tuple[str, bool]]:
    """The PostgreSQL database `name`, created and migrated when missing, kept afterwards: the
    URL, and whether it was there already (its data can then be measured again, not reloaded)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"{name!r} is not a plain lower-case database name")
    url, existed, engine = _migrated_database(name, admin_url)
    engine.dispose()
    yield url, existed


def _migrated_database(name: str, admin_url: str | None) -> tuple[str, bool, Any]:
    """Database `name` on the benchmarks' PostgreSQL server, created when missing and migrated:
    its URL, whether it was there already, and an engine on the maintenance database."""
    import sqlalchemy as sa

    from webhook.config import normalise_database_url
    from webhook.db import upgrade

    admin = sa.make_url(normalise_database_url(admin_url or admin_database_url()))
    if not admin.drivername.startswith("postgresql"):
        raise RuntimeError(f"the benchmarks need PostgreSQL, not {admin.drivername}")
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        existed = bool(
            conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).scalar()
        )
        if not existed:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
    except BaseException:
        if not existed:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
        raise
    return url, existed, engine


def libpq_url(sqlalchemy_url: str) -> str:
    """The same database as a plain postgresql:// URL (for psycopg and the processes' env)."""
    return re.sub(r"^postgresql\+psycopg://", "postgresql://", sqlalchemy_url)


# --- signed callbacks ---------------------------------------------------------------------------


def callback_params(
    recording_id: str, record_url: str, conference: str, start_ms: int, duration_ms: int
) -> dict[str, str]:
    """A recording callback's form fields, as Plivo's Record API sends them."""
    return {
        "api_id": str(uuid.uuid5(uuid.NAMESPACE_URL, recording_id)),
        "record_url": record_url,
        "recording_id": recording_id,
        "conference_name": conference,
        "recording_duration": str(round(duration_ms / 1000)),
        "recording_duration_ms": f"{duration_ms:.5f}",
        "recording_start_ms": f"{start_ms:.5f}",
        "recording_end_ms": f"{start_ms + duration_ms:.5f}",
    }


def plivo_v3_signature(auth_token: str, url: str, params: dict[str, str], nonce: str) -> str:
    """Plivo's V3 signature of a form POST to a URL without a query: base64(HMAC-SHA256(token,
    url + "?" + each field as key+value sorted by key + "." + nonce)). Written here rather than
    imported so the benchmark does not lean on the service's own code; tests/test_bench.py
    checks it against the official SDK's functions (through FakePlivo)."""
    body = "".join(f"{key}{params[key]}" for key in sorted(params))
    message = f"{url}?{body}.{nonce}" if body else f"{url}.{nonce}"
    digest = hmac.new(auth_token.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def signed_callback(
    public_url: str, params: dict[str, str], nonce: str, host: str, auth_token: str
) -> bytes:
    """A complete HTTP/1.1 POST of the callback, signed (V3) over the public URL."""
    from urllib.parse import urlencode

    signature = plivo_v3_signature(auth_token, public_url + CALLBACK_PATH, params, nonce)
    return http_request(
        "POST",
        CALLBACK_PATH,
        host,
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "PlivoHTTP/1.0 (bench)",
            "X-Plivo-Signature-V3": signature,
            "X-Plivo-Signature-V3-Nonce": nonce,
        },
        urlencode(params).encode(),
    )


def http_request(
    method: str, path: str, host: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    """The bytes of an HTTP/1.1 request (keep-alive, the client's default)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- the report ---------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class Report:
    """The figures of one benchmark run: tables for people, one JSON line for programs."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = params
        self.date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.machine = machine()
        self.results: dict[str, Any] = {}
        self.checks: dict[str, bool] = {}
        self.check_details: dict[str, str] = {}
        self.targets: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.started = time.perf_counter()
        say(
            f"# {name}  {self.date}  nproc={self.machine['nproc']} "
            f"python={self.machine['python']} load={self.machine['loadavg_at_start']}"
        )
        say("# params: " + " ".join(f"{k}={v}" for k, v in params.items()))

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """A correctness check: any failure makes the run exit non-zero."""
        self.checks[name] = bool(ok)
        if detail:
            self.check_details[name] = detail
        say(f"check {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
        return bool(ok)

    def target(self, name: str, value: float, goal: str, met: bool) -> None:
        """A performance target from the issue: reported, never an exit status."""
        self.targets[name] = {"value": value, "goal": goal, "met": bool(met)}

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"note: {text}")

    def table(self, title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        cells = [[fmt(c) for c in row] for row in rows]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
        say(f"\n{title}")
        say("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        say("  ".join("-" * w for w in widths))
        for row in cells:
            say(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )

    def print_targets(self) -> None:
        if self.targets:
            self.table(
                "targets",
                ["target", "value", "goal", "met"],
                [(k, v["value"], v["goal"], v["met"]) for k, v in self.targets.items()],
            )

    def finish(self, error: str | None = None) -> int:
        """Print the JSON line (last line of the output); the exit status for the checks."""
        ok = error is None and bool(self.checks) and all(self.checks.values())
        self.print_targets()
        line = {
            "bench": self.name,
            "ok": ok,
            "date": self.date,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": self.machine,
            "params": self.params,
            "results": self.results,
            "checks": self.checks,
            "check_details": self.check_details,
            "targets": self.targets,
            "notes": self.notes,
            "elapsed_s": round(time.perf_counter() - self.started, 1),
        }
        if error is not None:
            line["error"] = error
        print(json.dumps(line, default=str, separators=(",", ":")), flush=True)
        return 0 if ok else 1


def say(text: str) -> None:
    print(text, flush=True)


def run_main(
    report_factory: Callable[[], Report], body: Callable[[Report], None], timeout: float
) -> None:
    """Run a benchmark with a hard time limit; SIGTERM/SIGINT/the limit unwind through every
    cleanup (processes stopped, database dropped) and still print the JSON line."""

    class Stopped(Exception):
        pass

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.alarm(max(1, int(timeout)))
    report = report_factory()
    error = None
    try:
        body(report)
    except Stopped as exc:
        error = f"{exc} (time limit {int(timeout)} s)" if "SIGALRM" in str(exc) else str(exc)
    except Exception as exc:  # noqa: BLE001 - a crashed benchmark still prints its JSON line
        import traceback

        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(report.finish(error))
