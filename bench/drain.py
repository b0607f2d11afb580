"""Backlog drain: ordinary recordings (512 KiB each) queued in PostgreSQL, archived by `webhook
worker --once` processes from a local media server into moto's S3 server, against the reference:
the least loop that keeps the custody contract, streaming each recording from the same media
server into S3 with a SHA-256 checksum through one shared boto3 client and confirming it with
HEAD (`REFERENCE_LOOP` below, its own process).

    .venv/bin/python bench/drain.py [--recordings 200] [--kib 512] [--workers 1,2,4] [--rounds 5]

Each run gets its own freshly queued recordings (the same bytes, new ids) and is timed from the
start of the processes to the end of the last one, interpreter start-up included for both, so the
reference pays what the worker pays there; the service's bytecode is written first, as an
installed package has it (`compile_service`). The reference and one worker process run in rounds,
alternating which goes first; the figure is the median round's ratio (a run of a few seconds on a
shared machine moves by a fifth from one to the next). Then 2 and 4 worker processes run once
each, against the median round's reference. Start-up alone is timed too: the reference given no
job, a worker finding nothing due. The worker's runs must leave every recording archived in one
attempt with the right SHA-256.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import common
from common import Report

REFERENCE_LOOP = """
import base64, hashlib, json, sys
import boto3, requests
from boto3.s3.transfer import TransferConfig
bucket, endpoint = sys.argv[1:3]
jobs = json.loads(sys.stdin.read())
client = boto3.client("s3", endpoint_url=endpoint)
http = requests.Session()
config = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)

class Hashing:
    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0
    def read(self, n=-1):
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

bad = 0
for url, key in jobs:
    with http.get(url, stream=True, timeout=(5, 60)) as response:
        response.raise_for_status()
        body = Hashing(response.raw)
        client.upload_fileobj(body, bucket, key, Config=config,
                              ExtraArgs={"ChecksumAlgorithm": "SHA256"})
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    digest = base64.b64encode(body.sha.digest()).decode()
    if head["ContentLength"] != body.size or head.get("ChecksumSHA256", digest) != digest:
        bad += 1
print(json.dumps({"copied": len(jobs), "bad": bad}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=200)
    parser.add_argument("--kib", type=int, default=512)
    parser.add_argument(
        "--workers",
        default="1,2,4",
        help="worker process counts to run (one worker always runs, in the rounds)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="reference and one-worker runs, alternating first (an even count takes the lower "
        "of the two middle rounds)",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    return parser.parse_args()


def queue(url: str, media_base: str, content: str, ids: list[str], size: int) -> None:
    """Queue recordings as the callback view stores them, each serving the same `size` bytes."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from webhook.recordings import parse_report, record_report

    engine = sa.create_engine(url)
    try:
        with Session(engine) as session, session.begin():
            for recording_id in ids:
                report = parse_report(
                    common.callback_params(
                        recording_id,
                        media_base + common.media_path(content, size),
                        "bench/room-0001",
                        1_767_225_600_000,
                        30_000,
                    )
                )
                record_report(session, report)
    finally:
        engine.dispose()


def outcome(url: str, ids: list[str], expected_sha: str, size: int) -> dict[str, int]:
    """How the worker's recordings ended: archived right in one attempt, or not."""
    import psycopg

    with psycopg.connect(common.libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT status, attempts, archive_sha256, archive_size FROM recordings "
            "WHERE recording_id = ANY(%s)",
            (ids,),
        ).fetchall()
    right = sum(
        1
        for status, attempts, sha, stored in rows
        if status == "archived" and attempts == 1 and sha == expected_sha and stored == size
    )
    return {"rows": len(rows), "right": right}


def compile_service() -> None:
    """Write the service's bytecode beside its sources, as an installed package has it (pip
    compiles what it installs, boto3 and the reference's other libraries included). A checkout
    installed in editable mode, on a machine that sets PYTHONDONTWRITEBYTECODE (this project's
    do), would compile every module of the service again in each new process."""
    import compileall

    if not compileall.compile_dir(common.REPO / "webhook", quiet=1):
        raise SystemExit("the service's sources did not compile")


def run_together(
    commands: list[list[str]], env: dict[str, str], timeout: float
) -> tuple[float, bool]:
    """Start the processes together; the seconds until the last one ended, and whether each
    exited 0."""
    import subprocess

    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            command,
            env=env,
            cwd=common.REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for command in commands
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            common.say(err.decode(errors="replace")[-3000:])
    return time.perf_counter() - started, all(proc.returncode == 0 for proc in procs)


class Drain:
    """The benchmark's servers and database, and one run of either side over fresh recordings."""

    def __init__(self, stack: contextlib.ExitStack, args: argparse.Namespace) -> None:
        self.size = args.kib * 1024
        self.work = Path(tempfile.mkdtemp(prefix="bench-drain-"))
        stack.callback(shutil.rmtree, self.work, ignore_errors=True)
        self.url = stack.enter_context(common.temp_database("drain", args.database_url))
        moto, self.endpoint = common.start_moto(self.work)
        stack.callback(moto.stop)
        media, self.media_base = common.start_media(self.work)
        stack.callback(media.stop)
        self.bucket = f"bench-{uuid.uuid4().hex[:10]}"
        common.s3_client(self.endpoint).create_bucket(Bucket=self.bucket)
        self.aws = {**common.AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self.worker_env = common.service_env(
            self.work / "home-worker",
            {
                **self.aws,
                "DATABASE_URL": common.libpq_url(self.url),
                "ARCHIVE_URL": f"s3://{self.bucket}/x",
                "RECORDING_HOSTS": "127.0.0.1",
            },
        )
        self.content = f"drain-{uuid.uuid4().hex[:8]}"
        self.expected = common.media_sha256(self.content, self.size)
        self.media_url = self.media_base + common.media_path(self.content, self.size)
        self.timeout = args.timeout or 600.0

    def reference(self, label: str, recordings: int) -> dict[str, Any]:
        """The reference loop, one process, over `recordings` new keys."""
        import subprocess

        jobs = [[self.media_url, f"reference/{label}/{i:05d}.mp3"] for i in range(recordings)]
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", REFERENCE_LOOP, self.bucket, self.endpoint],
            input=json.dumps(jobs).encode(),
            env=common.service_env(self.work / "home-ref", self.aws),
            capture_output=True,
            timeout=self.timeout,
            check=False,
        )
        seconds = time.perf_counter() - started
        out: dict[str, Any] = {}
        with contextlib.suppress(ValueError, IndexError):
            out = json.loads(done.stdout.decode().strip().splitlines()[-1])
        if done.returncode != 0:
            common.say(done.stderr.decode(errors="replace")[-3000:])
        right = done.returncode == 0 and out.get("copied") == recordings and out.get("bad") == 0
        return {"seconds": round(seconds, 3), "right": right, **out}

    def workers(self, label: str, processes: int, recordings: int) -> dict[str, Any]:
        """`processes` workers started together on `recordings` freshly queued recordings."""
        ids = [f"{self.content}-{label}-{i:05d}" for i in range(recordings)]
        queue(self.url, self.media_base, self.content, ids, self.size)
        seconds, exited_0 = run_together(
            [[str(common.BIN / "webhook"), "worker", "--once"] for _ in range(processes)],
            self.worker_env,
            self.timeout,
        )
        ended = outcome(self.url, ids, self.expected, self.size)
        return {
            "seconds": round(seconds, 3),
            **ended,
            "all_right": exited_0 and ended["right"] == ended["rows"] == recordings,
        }


def run(report: Report, args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    n = args.recordings
    with contextlib.ExitStack() as stack:
        drain = Drain(stack, args)
        compile_service()
        # Start-up alone, each side once (not timed: it warms the page cache), then timed: the
        # reference given no job, a worker finding nothing due.
        drain.reference("warm", 0)
        drain.workers("warm", 1, 0)
        startup = {"reference": drain.reference("empty", 0), "worker": drain.workers("empty", 1, 0)}
        # Rounds of the reference and one worker process, alternating which goes first.
        rounds: list[dict[str, dict[str, Any]]] = []
        sides = {
            "reference": lambda label: drain.reference(label, n),
            "worker": lambda label: drain.workers(label, 1, n),
        }
        for number in range(1, args.rounds + 1):
            order = ["reference", "worker"] if number % 2 else ["worker", "reference"]
            rounds.append({side: sides[side](f"r{number}") for side in order})
        # How the drain scales with more worker processes (1 is the rounds' own).
        scaling = {p: drain.workers(f"x{p}", p, n) for p in counts if p != 1}

    def rate(measured: dict[str, Any]) -> float:
        return round(n / max(measured["seconds"], 1e-9), 1)

    ratios = [r["reference"]["seconds"] / max(r["worker"]["seconds"], 1e-9) for r in rounds]
    middle = common.median_index(ratios)
    ref_seconds = rounds[middle]["reference"]["seconds"]
    rows: list[list[Any]] = []
    for number, measured in enumerate(rounds, 1):
        for side in ("reference", "worker"):
            label = "reference loop (1 process)" if side == "reference" else "webhook worker x1"
            run_ = measured[side]
            rows.append([f"{label}, round {number}", n, run_["seconds"], rate(run_), ""])
        rows[-1][-1] = round(ratios[number - 1], 2)
    for processes, run_ in scaling.items():
        rows.append(
            [
                f"webhook worker x{processes}",
                n,
                run_["seconds"],
                rate(run_),
                round(ref_seconds / max(run_["seconds"], 1e-9), 2),
            ]
        )
    report.table(
        f"backlog drain, {n} recordings of {args.kib} KiB into moto S3 (x reference: a round's "
        "worker against that round's reference; more workers against the median round's)",
        ["method", "recordings", "seconds", "recordings/s", "x reference"],
        rows,
    )
    report.table(
        "start-up alone (the reference given no job, a worker finding nothing due)",
        ["process", "seconds"],
        [[side, run_["seconds"]] for side, run_ in startup.items()],
    )
    ratio = ratios[middle]
    common.say(
        "\nratio one worker/reference by round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"; the median round: {ratio:.2f}"
    )
    report.results.update(
        {
            "rounds": rounds,
            "ratios_one_worker_reference": [round(r, 3) for r in ratios],
            "ratio_one_worker_reference": round(ratio, 3),
            "reference_rate_median_round": rate(rounds[middle]["reference"]),
            **{f"workers_{p}": {**run_, "recordings_s": rate(run_)} for p, run_ in scaling.items()},
            "startup_seconds": {side: run_["seconds"] for side, run_ in startup.items()},
        }
    )
    report.check(
        "the reference copied every recording, each confirmed by HEAD, in every run",
        all(r["reference"]["right"] for r in rounds) and startup["reference"]["right"],
        str([r["reference"].get("copied") for r in rounds]),
    )
    for label, runs in (
        ("one worker", [r["worker"] for r in rounds]),
        *((f"{p} workers", [run_]) for p, run_ in scaling.items()),
    ):
        report.check(
            f"{label} archived every recording once with the right SHA-256, in every run",
            all(run_["all_right"] for run_ in runs),
            str([f"{run_['right']} of {n}" for run_ in runs]),
        )
    report.check(
        "a worker finding nothing due started and exited 0",
        startup["worker"]["all_right"],
        f"{startup['worker']['seconds']} s",
    )
    report.target("one worker / reference loop", round(ratio, 2), ">= 0.8", ratio >= 0.8)


def main() -> None:
    args = parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    timeout = args.timeout or 900.0
    params = {
        "recordings": args.recordings,
        "kib": args.kib,
        "workers": args.workers,
        "rounds": args.rounds,
    }
    common.run_main(lambda: Report("drain", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
