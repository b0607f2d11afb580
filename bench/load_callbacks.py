"""Load with duplicates (issue 4): signed callbacks, a share of them exact duplicates (same
fields, fresh nonce, as Plivo's retries), sent concurrently to gunicorn while several archive
workers run on PostgreSQL; then every unique recording must be archived exactly once.

    .venv/bin/python bench/load_callbacks.py [--callbacks 10000] [--duplicates 0.2]
        [--workers 4] [--connections 32] [--media-kib 16]

Runs the Procfile's web command (WEB_CONCURRENCY workers, default nproc) and `--workers` of its
worker command, a media server with small generated recordings on 127.0.0.1 and moto's S3 (a
versioned bucket, so a second upload of a key would show as a second version). Half of the
duplicates follow their original at once (sent on another connection at the same instant), the
rest come later, interleaved. When the queue has drained it checks: no 5xx, one callback_log row
per callback, every unique recording `archived` with attempts == 1 and the right size and SHA-256,
exactly one S3 object version per key and as many keys as unique recordings, none `failed`, and
the bytes of a sample of objects read back from S3.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import common
import loadgen
from common import Report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=10_000, help="callbacks in all")
    parser.add_argument("--duplicates", type=float, default=0.2, help="share that are duplicates")
    parser.add_argument("--workers", type=int, default=4, help="archive worker processes")
    parser.add_argument("--web-concurrency", type=int, default=common.default_workers())
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--media-kib", type=int, default=16, help="size of each recording")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--verify-sample", type=int, default=200, help="objects read back")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    return parser.parse_args()


def plan_callbacks(
    args: argparse.Namespace, public_url: str, media_base: str, tag: str
) -> tuple[list[bytes], dict[str, tuple[int, str]], int]:
    """The requests in sending order, each unique recording's (size, SHA-256), and how many
    duplicates sit right behind their original."""
    rng = random.Random(args.seed)
    duplicates = round(args.callbacks * args.duplicates)
    unique = args.callbacks - duplicates
    host = public_url.removeprefix("http://")
    params = []
    expected: dict[str, tuple[int, str]] = {}
    for i in range(unique):
        recording_id = f"lc-{tag}-{i:06d}"
        size = args.media_kib * 1024 + (i * 37) % 4096
        params.append(
            common.callback_params(
                recording_id,
                media_base + common.media_path(recording_id, size),
                f"sales/room-{i % 500:04d}",
                1_767_225_600_000 + i * 1000,
                30_000 + (i * 7919) % 600_000,
            )
        )
        expected[recording_id] = (size, common.media_sha256(recording_id, size))
    order: list[tuple[float, int]] = [(float(i), i) for i in range(unique)]
    targets = (
        rng.sample(range(unique), duplicates)
        if duplicates <= unique
        else [rng.randrange(unique) for _ in range(duplicates)]
    )
    adjacent = 0
    for n, target in enumerate(targets):
        if n % 2 == 0:
            order.append((target + 0.5, target))  # right behind the original: same instant
            adjacent += 1
        else:
            order.append((rng.uniform(target + 1, unique + 1), target))
    order.sort()
    requests = [
        common.signed_callback(
            public_url,
            params[i],
            f"{uuid.uuid4().int % 10**20:020d}",  # every delivery has its own nonce
            host,
            common.PLIVO_AUTH_TOKEN,
        )
        for _, i in order
    ]
    return requests, expected, adjacent


def json_line(line: str) -> dict[str, Any]:
    """A structured log line, or {} for anything else."""
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def queue_state(conn: Any) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM recordings GROUP BY status").fetchall()
    return {status: count for status, count in rows}


def run(report: Report, args: argparse.Namespace) -> None:
    import psycopg

    generator = loadgen.choose_generator(args.generator)
    report.params["generator"] = generator
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-load-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        url = stack.enter_context(common.temp_database("load", args.database_url))
        moto, endpoint = common.start_moto(work)
        stack.callback(moto.stop)
        media, media_base = common.start_media(work)
        stack.callback(media.stop)
        s3 = common.s3_client(endpoint)
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        port = common.free_port()
        public_url = f"http://127.0.0.1:{port}"
        tag = uuid.uuid4().hex[:8]
        requests, expected, adjacent = plan_callbacks(args, public_url, media_base, tag)
        unique = len(expected)
        env = common.service_env(
            work / "home",
            {
                **common.AWS_ENV,
                "AWS_ENDPOINT_URL": endpoint,
                "WEB_CONCURRENCY": str(args.web_concurrency),
                "DATABASE_URL": common.libpq_url(url),
                "ARCHIVE_URL": f"s3://{bucket}/archive",
                "PUBLIC_URL": public_url,
                "PLIVO_AUTH_ID": common.PLIVO_AUTH_ID,
                "PLIVO_AUTH_TOKEN": common.PLIVO_AUTH_TOKEN,
                "RECORDING_HOSTS": "127.0.0.1",
                "ARCHIVE_RETRY_BASE_SECONDS": "1",
            },
        )
        web = common.start_gunicorn("gunicorn", port, env, work)
        stack.callback(web.stop)
        worker_argv = shlex.split(common.read_procfile()["worker"])
        worker_argv[0] = str(common.BIN / worker_argv[0])
        workers = [
            common.Service(f"worker-{n}", worker_argv, env, work) for n in range(args.workers)
        ]
        for worker in workers:
            stack.callback(worker.stop)
        common.wait_http(public_url + "/healthz", 30, web, 200)

        conn = stack.enter_context(psycopg.connect(common.libpq_url(url), autocommit=True))
        sent_at = time.perf_counter()
        load = loadgen.send_load(
            port,
            requests,
            args.connections,
            generator,
            work,
            ["accepted", "duplicate"],
            timeout=args.timeout,
        )
        sent_done = time.perf_counter()
        deadline = time.monotonic() + args.timeout
        while True:
            state = queue_state(conn)
            busy = state.get("pending", 0) + state.get("archiving", 0)
            if sum(state.values()) >= unique and busy == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the queue did not drain: {state}")
            dead = [w.name for w in workers if not w.running]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited:\n{workers[0].tail()}")
            time.sleep(0.2)
        drained = time.perf_counter()
        worker_peaks = [
            common.proc_status(pid).get("VmHWM", 0)
            for w in workers
            for pid in [w.pid, *common.descendants(w.pid)]
        ]
        for worker in workers:
            worker.stop()
        logs = [w.log_path.read_text(errors="replace") for w in workers]
        retries_logged = sum(log.count("will retry") for log in logs)
        job_seconds = [
            float(entry["seconds"])
            for log in logs
            for entry in map(json_line, log.splitlines())
            if entry.get("msg") == "archived" and "seconds" in entry
        ]

        rows = conn.execute(
            "SELECT recording_id, status, attempts, archive_key, archive_size, archive_sha256 "
            "FROM recordings"
        ).fetchall()
        log_counts = conn.execute(
            "SELECT count(*) FILTER (WHERE NOT duplicate), count(*) FILTER (WHERE duplicate) "
            "FROM callback_log"
        ).fetchone()
        archived_span = conn.execute(
            "SELECT extract(epoch FROM max(archived_at) - min(archived_at)) FROM recordings"
        ).fetchone()
        versions: dict[str, int] = {}
        delete_markers = 0
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for version in page.get("Versions", []):
                versions[version["Key"]] = versions.get(version["Key"], 0) + 1
            delete_markers += len(page.get("DeleteMarkers", []))
        by_id = {r[0]: r for r in rows}
        sample = random.Random(args.seed).sample(sorted(by_id), min(args.verify_sample, len(by_id)))
        sample_ok = 0
        for recording_id in sample:
            body = s3.get_object(Bucket=bucket, Key=by_id[recording_id][3])["Body"].read()
            sample_ok += hashlib.sha256(body).hexdigest() == expected[recording_id][1]

    statuses = {status: sum(1 for r in rows if r[1] == status) for status in {r[1] for r in rows}}
    wrong_digest = [r[0] for r in rows if r[0] in expected and (r[4], r[5]) != expected[r[0]]]
    not_once = [r[0] for r in rows if r[2] != 1]
    keys = {r[3] for r in rows}
    send_s = sent_done - sent_at
    drain_s = drained - sent_done
    total_s = drained - sent_at
    span = float(archived_span[0] or 0) if archived_span else 0.0
    jobs = common.summary_ms(job_seconds)
    report.table(
        f"{args.callbacks:,} callbacks ({args.callbacks - unique:,} duplicates, {adjacent:,} sent "
        f"alongside their original), gunicorn {args.web_concurrency} worker(s), "
        f"{args.workers} archive workers",
        ["measure", "value"],
        [
            ["callbacks/s (generator: " + load.generator + ")", load.rps],
            ["callback latency p50 ms", load.latency_ms["p50"]],
            ["callback latency p99 ms", load.latency_ms["p99"]],
            ["sending took s", round(send_s, 2)],
            ["queue drained after the last callback s", round(drain_s, 2)],
            ["first callback → all archived s", round(total_s, 2)],
            ["archive rate (recordings/s, first callback → drained)", unique / total_s],
            ["archive rate (recordings/s, first → last archived_at)", unique / span if span else 0],
            ["archive job p50 ms (worker's own timing)", jobs["p50"]],
            ["archive job p95 ms", jobs["p95"]],
            ["worker peak RSS MiB (max)", max(worker_peaks, default=0) / 1024],
            ["retries logged by the workers", retries_logged],
        ],
    )
    report.results.update(
        {
            "load": load.brief(),
            "unique": unique,
            "duplicates": args.callbacks - unique,
            "duplicates_alongside_original": adjacent,
            "send_s": round(send_s, 3),
            "drain_after_send_s": round(drain_s, 3),
            "total_s": round(total_s, 3),
            "archive_rate_per_s": round(unique / total_s, 1),
            "archive_rate_while_archiving_per_s": round(unique / span, 1) if span else None,
            "statuses": statuses,
            "callback_log": {"new": log_counts[0], "duplicate": log_counts[1]}
            if log_counts
            else {},
            "s3_keys": len(versions),
            "s3_versions": sum(versions.values()),
            "retries_logged": retries_logged,
            "archive_job_ms": jobs,
            "worker_peak_rss_mib": round(max(worker_peaks, default=0) / 1024, 1),
        }
    )
    five_xx = {s: n for s, n in load.statuses.items() if s.startswith("5")}
    report.check("zero 5xx", not five_xx, f"statuses {load.statuses}")
    report.check(
        "every callback answered 200 with no socket error",
        load.non_200 == 0 and load.socket_errors == 0,
        f"statuses {load.statuses}, socket errors {load.socket_errors}",
    )
    report.check(
        "callback_log: one row per callback, duplicates flagged",
        log_counts is not None
        and log_counts[0] == unique
        and log_counts[1] == args.callbacks - unique,
        f"{log_counts}",
    )
    report.check(
        "one recording row per unique recording, every one archived, none failed",
        len(rows) == unique and statuses == {"archived": unique},
        f"{len(rows)} rows, {statuses}",
    )
    report.check("every recording archived in one attempt", not not_once, f"{len(not_once)} not")
    report.check(
        "size and SHA-256 right for every recording", not wrong_digest, f"{len(wrong_digest)} wrong"
    )
    report.check(
        "one S3 object version per key, as many keys as unique recordings",
        len(versions) == unique
        and all(n == 1 for n in versions.values())
        and delete_markers == 0
        and set(versions) == keys,
        f"{len(versions)} keys, {sum(versions.values())} versions, {delete_markers} delete markers",
    )
    report.check(
        f"bytes read back from S3 match for a sample of {len(sample)}",
        sample_ok == len(sample),
        f"{sample_ok} of {len(sample)}",
    )


def main() -> None:
    args = parse_args()
    args.timeout = args.timeout or 600 + args.callbacks * 0.1
    params = {
        "callbacks": args.callbacks,
        "duplicates": args.duplicates,
        "workers": args.workers,
        "web_concurrency": args.web_concurrency,
        "connections": args.connections,
        "media_kib": args.media_kib,
    }
    common.run_main(lambda: Report("load_callbacks", params), lambda r: run(r, args), args.timeout)


if __name__ == "__main__":
    main()
