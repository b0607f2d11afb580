"""Backlog drain: ordinary recordings (512 KiB each) queued in PostgreSQL, archived by `webhook
worker --once` processes from a local media server into moto's S3 server, against the reference:
the least loop that keeps the custody contract, streaming each recording from the same media
server into S3 with a SHA-256 checksum through one shared boto3 client and confirming it with
HEAD (`REFERENCE_LOOP` below, its own process).

    .venv/bin/python bench/drain.py [--recordings 200] [--kib 512] [--workers 1,2,4]

Each run gets its own freshly queued recordings (the same bytes, new ids) and is timed from the
start of the processes to the end of the last one, interpreter start-up included for both, so the
reference pays what the worker pays there. The worker's runs must leave every recording archived
in one attempt with the right SHA-256.
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
    parser.add_argument("--workers", default="1,2,4", help="worker process counts to run")
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


def run_together(commands: list[list[str]], env: dict[str, str], timeout: float) -> float:
    """Start the commands together, wait for all; seconds from start to the last exit."""
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
    return time.perf_counter() - started


def run(report: Report, args: argparse.Namespace) -> None:
    size = args.kib * 1024
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-drain-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        url = stack.enter_context(common.temp_database("drain", args.database_url))
        moto, endpoint = common.start_moto(work)
        stack.callback(moto.stop)
        media, media_base = common.start_media(work)
        stack.callback(media.stop)
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        common.s3_client(endpoint).create_bucket(Bucket=bucket)
        aws = {**common.AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
        worker_env = common.service_env(
            work / "home-worker",
            {
                **aws,
                "DATABASE_URL": common.libpq_url(url),
                "ARCHIVE_URL": f"s3://{bucket}/x",
                "RECORDING_HOSTS": "127.0.0.1",
            },
        )
        content = f"drain-{uuid.uuid4().hex[:8]}"
        expected = common.media_sha256(content, size)
        media_url = media_base + common.media_path(content, size)
        timeout = args.timeout or 600.0

        # The reference loop, one process.
        import subprocess

        jobs = [[media_url, f"reference/{i:05d}.mp3"] for i in range(args.recordings)]
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", REFERENCE_LOOP, bucket, endpoint],
            input=json.dumps(jobs).encode(),
            env=common.service_env(work / "home-ref", aws),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        ref_seconds = time.perf_counter() - started
        ref_out: dict[str, Any] = {}
        with contextlib.suppress(ValueError, IndexError):
            ref_out = json.loads(done.stdout.decode().strip().splitlines()[-1])
        if done.returncode != 0:
            common.say(done.stderr.decode(errors="replace")[-3000:])
        results["reference"] = {
            "seconds": round(ref_seconds, 2),
            "recordings_s": round(args.recordings / ref_seconds, 1),
            **ref_out,
        }
        report.check(
            "reference copied every recording, each confirmed by HEAD",
            done.returncode == 0
            and ref_out.get("copied") == args.recordings
            and ref_out.get("bad") == 0,
            f"exit {done.returncode}, {ref_out}",
        )

        # The worker, with 1, 2, 4 processes.
        for n in counts:
            ids = [f"{content}-w{n}-{i:05d}" for i in range(args.recordings)]
            queue(url, media_base, content, ids, size)
            seconds = run_together(
                [[str(common.BIN / "webhook"), "worker", "--once"] for _ in range(n)],
                worker_env,
                timeout,
            )
            ended = outcome(url, ids, expected, size)
            results[f"workers_{n}"] = {
                "seconds": round(seconds, 2),
                "recordings_s": round(args.recordings / seconds, 1),
                **ended,
            }
            report.check(
                f"{n} worker(s) archived every recording once with the right SHA-256",
                ended["right"] == args.recordings,
                f"{ended['right']} of {args.recordings}",
            )

    ref_rate = results["reference"]["recordings_s"]
    rows = [
        [
            "reference loop (1 process)",
            args.recordings,
            results["reference"]["seconds"],
            ref_rate,
            1.0,
        ]
    ]
    for n in counts:
        r = results[f"workers_{n}"]
        rows.append(
            [
                f"webhook worker --once x{n}",
                args.recordings,
                r["seconds"],
                r["recordings_s"],
                round(r["recordings_s"] / ref_rate, 2),
            ]
        )
    report.table(
        f"backlog drain, {args.recordings} recordings of {args.kib} KiB into moto S3",
        ["method", "recordings", "seconds", "recordings/s", "x reference"],
        rows,
    )
    report.results.update(results)
    if 1 in counts:
        ratio = results["workers_1"]["recordings_s"] / ref_rate
        report.results["ratio_one_worker_reference"] = round(ratio, 3)
        report.target("one worker / reference loop", round(ratio, 2), ">= 0.8", ratio >= 0.8)


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 900.0
    params = {"recordings": args.recordings, "kib": args.kib, "workers": args.workers}
    common.run_main(lambda: Report("drain", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
