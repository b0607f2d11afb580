"""Archive streaming: the worker (`webhook worker --once`, its own process) archiving a 1 MiB and
a 1 GiB recording from a local HTTP media server into moto's S3 server, against boto3's own
`upload_file` of the same bytes from a file on disk (also its own process), into the same moto.

    .venv/bin/python bench/archive_stream.py [--big-mib 1024] [--small-mib 1] [--repeat 1]

Peak memory is each process's ru_maxrss (VmHWM) from wait4; throughput is bytes over the time
of the transfer itself (the worker's "archived" log line times the job; upload_file is timed
around the call), so interpreter start-up is left out of both. The media server streams a
repeating pseudo-random block and the expected SHA-256 is computed the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import common
from common import MIB, Report

UPLOAD_FILE_CHILD = """
import json, sys, time
import boto3
path, bucket, key, endpoint = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint)
started = time.perf_counter()
client.upload_file(path, bucket, key)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-mib", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each size and method")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    return parser.parse_args()


def recording_row(url: str, name: str) -> dict[str, Any]:
    """What the database says about a recording after the worker ran."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(common.libpq_url(url), row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT status, attempts, archive_key, archive_size, archive_sha256, last_error "
            "FROM recordings WHERE recording_id = %s",
            (name,),
        ).fetchone()
    return dict(row or {})


def archived_seconds(stdout: str, name: str) -> float | None:
    """The job's own time, from the worker's structured "archived" log line."""
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if (
                isinstance(entry, dict)
                and entry.get("msg") == "archived"
                and entry.get("recording_id") == name
            ):
                return float(entry["seconds"])
    return None


def write_file(path: Path, name: str, size: int) -> None:
    """The same bytes the media server sends for `name`, on disk for upload_file."""
    with path.open("wb") as out:
        for chunk in common.media_chunks(name, size):
            out.write(chunk)


def run(report: Report, args: argparse.Namespace) -> None:
    sizes = {"small": args.small_mib * MIB, "big": args.big_mib * MIB}
    runs: dict[str, list[dict[str, Any]]] = {"worker": [], "upload_file": []}
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-archive-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        url = stack.enter_context(common.temp_database("archive", args.database_url))
        moto, endpoint = common.start_moto(work)
        stack.callback(moto.stop)
        media, media_base = common.start_media(work)
        stack.callback(media.stop)
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        s3 = common.s3_client(endpoint)
        s3.create_bucket(Bucket=bucket)
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
        upload_env = common.service_env(work / "home-upload", aws)
        seed = uuid.uuid4().hex[:8]
        for label, size in sizes.items():
            # The same bytes for every run of a size: one file on disk, one expected digest.
            content_name = f"media-{seed}-{label}"
            expected = common.media_sha256(content_name, size)
            path = work / f"{label}.mp3"
            write_file(path, content_name, size)
            for attempt in range(args.repeat):
                # Every run of a size gets the same bytes under its own recording_id.
                recording_id = f"{content_name}-{attempt}"
                queue_recording(url, media_base, content_name, recording_id, size)
                measured = common.run_measured(
                    [str(common.BIN / "webhook"), "worker", "--once"],
                    worker_env,
                    timeout=max(60.0, size / MIB * 2),
                )
                row = recording_row(url, recording_id)
                seconds = archived_seconds(measured.stdout, recording_id)
                runs["worker"].append(
                    {
                        "size": label,
                        "bytes": size,
                        "exit": measured.returncode,
                        "seconds": seconds,
                        "mib_s": round(size / MIB / seconds, 1) if seconds else None,
                        "wall_s": round(measured.wall_s, 2),
                        "peak_rss_mib": round(measured.maxrss_kib / 1024, 1),
                        "cpu_s": round(measured.user_s + measured.sys_s, 2),
                        "status": row.get("status"),
                        "sha256_ok": row.get("archive_sha256") == expected,
                        "size_ok": row.get("archive_size") == size,
                        "attempts": row.get("attempts"),
                        "last_error": row.get("last_error"),
                    }
                )
                if measured.returncode != 0 or row.get("status") != "archived":
                    common.say(measured.stdout[-3000:] + measured.stderr[-3000:])
                key = f"upload-file/{label}-{attempt}.mp3"
                measured = common.run_measured(
                    [sys.executable, "-c", UPLOAD_FILE_CHILD, str(path), bucket, key, endpoint],
                    upload_env,
                    timeout=max(60.0, size / MIB * 2),
                )
                seconds = None
                with contextlib.suppress(ValueError, IndexError):
                    seconds = json.loads(measured.stdout.strip().splitlines()[-1])["seconds"]
                head = {}
                with contextlib.suppress(Exception):
                    head = s3.head_object(Bucket=bucket, Key=key)
                runs["upload_file"].append(
                    {
                        "size": label,
                        "bytes": size,
                        "exit": measured.returncode,
                        "seconds": round(seconds, 3) if seconds else None,
                        "mib_s": round(size / MIB / seconds, 1) if seconds else None,
                        "wall_s": round(measured.wall_s, 2),
                        "peak_rss_mib": round(measured.maxrss_kib / 1024, 1),
                        "cpu_s": round(measured.user_s + measured.sys_s, 2),
                        "size_ok": head.get("ContentLength") == size,
                    }
                )
                if measured.returncode != 0:
                    common.say(measured.stderr[-3000:])
            path.unlink()
            key = recording_row(url, recording_id).get("archive_key")
            try:
                stored_size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
            except Exception as exc:  # noqa: BLE001 - any failure here is a failed check
                stored_size = f"not readable: {exc}"
            report.check(
                f"worker's {label} object in S3 has the recording's size",
                stored_size == size,
                f"{stored_size} bytes",
            )

    def median(method: str, label: str, field: str) -> float:
        values = [r[field] for r in runs[method] if r["size"] == label and r[field] is not None]
        return statistics.median(values) if values else float("nan")

    def peak(method: str, label: str) -> float:
        return max(r["peak_rss_mib"] for r in runs[method] if r["size"] == label)

    rows = []
    for method in ("worker", "upload_file"):
        for label, size in sizes.items():
            rows.append(
                [
                    "webhook worker --once" if method == "worker" else "boto3 upload_file",
                    f"{size / MIB:,.0f} MiB",
                    median(method, label, "seconds"),
                    median(method, label, "mib_s"),
                    peak(method, label),
                    median(method, label, "cpu_s"),
                    median(method, label, "wall_s"),
                ]
            )
    report.table(
        f"archive streaming into moto S3 (median of {args.repeat} run(s), peak RSS = max)",
        ["method", "size", "transfer s", "MiB/s", "peak RSS MiB", "process CPU s", "process s"],
        rows,
    )
    growth = peak("worker", "big") - peak("worker", "small")
    ratio = median("worker", "big", "mib_s") / median("upload_file", "big", "mib_s")
    common.say(
        f"\nworker peak RSS grows {growth:.1f} MiB from {args.small_mib} MiB to {args.big_mib} "
        f"MiB; worker/upload_file throughput at {args.big_mib} MiB = {ratio:.2f}"
    )
    report.results.update(
        {
            "runs": runs,
            "worker_peak_rss_growth_mib": round(growth, 1),
            "throughput_ratio_worker_upload_file": round(ratio, 3),
        }
    )
    for result in runs["worker"]:
        report.check(
            f"worker archived the {result['size']} recording with the right SHA-256 and size",
            result["exit"] == 0
            and result["status"] == "archived"
            and result["sha256_ok"]
            and result["size_ok"]
            and result["attempts"] == 1,
            f"exit {result['exit']}, {result['status']}, attempts {result['attempts']}, "
            f"sha256 {'ok' if result['sha256_ok'] else 'WRONG'}, {result['last_error'] or ''}",
        )
    for result in runs["upload_file"]:
        report.check(
            f"upload_file stored the {result['size']} file",
            result["exit"] == 0 and result["size_ok"],
            f"exit {result['exit']}",
        )
    report.target(
        f"worker peak RSS growth {args.small_mib} MiB → {args.big_mib} MiB (MiB)",
        round(growth, 1),
        "<= 64",
        growth <= 64,
    )
    report.target("worker / upload_file throughput", round(ratio, 2), ">= 0.9", ratio >= 0.9)


def queue_recording(url: str, media_base: str, content: str, recording_id: str, size: int) -> None:
    """Queue a recording as the callback view stores it; its media URL serves `size` bytes
    seeded by `content`."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from webhook.recordings import parse_report, record_report

    report = parse_report(
        common.callback_params(
            recording_id,
            media_base + common.media_path(content, size),
            "bench/room-0001",
            1_767_225_600_000,
            # As long as `size` bytes of mp3 last at 128 kbit/s (the worker bounds a download
            # by the recording's duration), ten minutes at least.
            max(600_000, size // 16),
        )
    )
    engine = sa.create_engine(url)
    try:
        with Session(engine) as session, session.begin():
            record_report(session, report)
    finally:
        engine.dispose()


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 300 + args.big_mib * 1.5 * args.repeat
    params = {
        "big_mib": args.big_mib,
        "small_mib": args.small_mib,
        "repeat": args.repeat,
        "media": "local HTTP server (own process), keep-alive",
        "s3": "moto_server (own process)",
    }
    common.run_main(lambda: Report("archive_stream", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
