"""The benchmarks under bench/ at a tiny size, so they cannot rot: each exits 0, ends with one JSON
line, and the correctness checks inside it pass. Performance targets are not asserted here."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from tests.fakeplivo import FakePlivo

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")

pytestmark = pytest.mark.bench

T = TypeVar("T")


def needs_postgres(test: T) -> T:
    """Marks a benchmark that creates its own database on TEST_DATABASE_URL's server."""
    skip = pytest.mark.skipif(
        not TEST_DATABASE_URL,
        reason="the benchmarks create their own PostgreSQL database: set TEST_DATABASE_URL",
    )
    return skip(pytest.mark.postgres(test))  # type: ignore[no-any-return]


@functools.cache
def bench_common() -> ModuleType:
    """bench/common.py, loaded by path (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, *args: str, timeout: float = 150.0) -> dict[str, Any]:
    """Run bench/<name>.py; its final JSON line, once it says every check passed."""
    argv = [sys.executable, str(BENCH / f"{name}.py"), *args]
    if name != "startup":
        argv += ["--database-url", str(TEST_DATABASE_URL)]
    popen = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script stop its servers and drop its database.
        popen.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = popen.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            popen.kill()
            stdout, stderr = popen.communicate()
        pytest.fail(f"{name} ran over {timeout} s\n{stdout[-4000:]}\n{stderr[-4000:]}")
    output = f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}"
    lines = stdout.strip().splitlines()
    assert lines, f"{name} printed nothing (exit {popen.returncode})\n{output}"
    result: dict[str, Any] = json.loads(lines[-1])
    failed = [check for check, ok in result.get("checks", {}).items() if not ok]
    assert popen.returncode == 0, f"{name} exited {popen.returncode}, failed {failed}\n{output}"
    assert result["bench"] == name
    assert result["checks"], f"{name} checked nothing\n{output}"
    assert not failed and result["ok"] is True
    assert {"date", "machine", "params", "results", "targets"} <= set(result)
    assert result["machine"]["nproc"] >= 1 and result["machine"]["python"]
    return result


# --- the helpers themselves ---------------------------------------------------------------------


def test_signed_callbacks_carry_the_signature_plivo_computes() -> None:
    common = bench_common()
    params = common.callback_params(
        "rec-1", "https://media.plivo.com/r/rec-1.mp3", "sales/room-0001", 1767225600000, 61000
    )
    raw = common.signed_callback(
        "http://127.0.0.1:8000", params, "12345678901234567890", "127.0.0.1:8000", "tok"
    )
    expected = FakePlivo(auth_token="tok").sign_request(
        "POST", "http://127.0.0.1:8000/plivo/recording", params, nonce="12345678901234567890"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert headers["X-Plivo-Signature-V3"] == expected["X-Plivo-Signature-V3"]
    assert headers["X-Plivo-Signature-V3-Nonce"] == "12345678901234567890"
    assert int(headers["Content-Length"]) == len(body)


def test_percentile_interpolates_between_ranks() -> None:
    common = bench_common()
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    assert common.percentile([5], 99) == 5
    assert common.percentile(list(range(101)), 95) == 95


def test_the_median_round_is_the_lower_middle_one() -> None:
    common = bench_common()
    assert common.median_index([0.9, 0.7, 0.8]) == 2
    assert common.median_index([0.9, 0.7, 0.8, 1.0]) == 2
    assert common.median_index([0.5]) == 0


def test_generated_media_is_the_same_bytes_in_any_chunking() -> None:
    common = bench_common()
    whole = b"".join(common.media_chunks("seed", 3 * 1024 * 1024 + 5))
    assert len(whole) == 3 * 1024 * 1024 + 5
    small = b"".join(common.media_chunks("seed", 3 * 1024 * 1024 + 5, chunk=1000))
    assert small == whole
    assert common.media_sha256("seed", len(whole)) == hashlib.sha256(whole).hexdigest()


# --- each benchmark, tiny -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "generator",
    [
        "python",
        pytest.param(
            "wrk",
            marks=pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed"),
        ),
    ],
)
@needs_postgres
def test_ingest(generator: str) -> None:
    result = run_bench(
        "ingest", "--callbacks", "200", "--warmup", "10", "--rounds", "2", "--generator", generator
    )
    assert result["results"]["database"]["bench"] == 200
    assert result["results"]["app"]["generator"] == generator


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not installed")
@needs_postgres
def test_ingest_instructions() -> None:
    result = run_bench("ingest_instructions", "--callbacks", "30", "--warmup", "10", timeout=600.0)
    counts = result["results"]["instructions_per_callback"]
    # A callback is hundreds of thousands of instructions in either server, not a stray count.
    assert counts["app"] > 100_000 and counts["reference"] > 100_000


@needs_postgres
def test_archive_stream() -> None:
    result = run_bench("archive_stream", "--big-mib", "8")
    assert {r["size"] for r in result["results"]["runs"]["worker"]} == {"small", "big"}


@needs_postgres
def test_drain() -> None:
    result = run_bench(
        "drain", "--recordings", "6", "--kib", "64", "--workers", "1,2", "--rounds", "2"
    )
    figures = result["results"]
    assert [sorted(r) for r in figures["rounds"]] == [["reference", "worker"]] * 2
    assert all(r["worker"]["right"] == 6 for r in figures["rounds"])
    assert figures["workers_2"]["right"] == 6
    assert len(figures["ratios_one_worker_reference"]) == 2
    assert figures["startup_seconds"]["worker"] > 0


@needs_postgres
def test_query() -> None:
    result = run_bench(
        "query", "--recordings", "2000", "--repeat", "3", "--pages", "12", "--quiet-plans"
    )
    cases = result["results"]["cases"]
    assert "legal_hold=true" in cases and "page 12 (following next_cursor)" in cases
    assert all(case["sql"] for case in cases.values())
    assert "q common word (the)" in cases and "q word + participant + since/until" in cases
    assert result["results"]["transcripts"]["transcripts"] > 1900


def test_startup() -> None:
    result = run_bench("startup", "--runs", "2")
    assert result["results"]["create_app_s"]["median"] > 0


@needs_postgres
def test_export() -> None:
    result = run_bench("export", "--recordings", "500", "--small", "100")
    assert result["results"]["load"]["recordings"] == 500


@needs_postgres
def test_load_callbacks() -> None:
    result = run_bench("load_callbacks", "--callbacks", "200", "--workers", "2")
    assert result["results"]["unique"] == 160
    assert result["results"]["statuses"] == {"archived": 160}
