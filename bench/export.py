"""Export (issue 3): stream `GET /api/recordings/export` as NDJSON and CSV from a live gunicorn
over a bulk-loaded PostgreSQL data set, and watch the gunicorn worker's memory.

    .venv/bin/python bench/export.py [--recordings 100000] [--small 10000]

gunicorn runs the Procfile's web command with WEB_CONCURRENCY=1, so the one worker is the process
that streams. Each export is read in 64 KiB chunks and counted, never kept. For each export the
worker's peak RSS is reset (/proc/<pid>/clear_refs) and read back from VmHWM, and VmRSS is sampled
while it streams: the peak for `--small` rows (a `since` filter that matches exactly that many)
and for all rows should be the same if memory is flat.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import dataset
from common import MIB, Report

from webhook.api.recordings import EXPORT_COLUMNS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=100_000)
    parser.add_argument("--participants-per", type=int, default=3)
    parser.add_argument("--small", type=int, default=10_000, help="rows of the smaller export")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    return parser.parse_args()


def since_for(url: str, rows: int) -> str:
    """A `since` that matches exactly the newest `rows` recordings (start_ms are distinct)."""
    import psycopg

    with psycopg.connect(common.libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT start_ms FROM recordings ORDER BY start_ms DESC OFFSET %s LIMIT 1",
            (rows - 1,),
        ).fetchone()
    assert row is not None
    moment = dt.datetime.fromtimestamp(row[0] / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds")


def stream(base: str, token: str, params: dict[str, str], worker: int) -> dict[str, Any]:
    """One export, read in chunks and counted; the worker's memory before, during and after."""
    import requests

    before = common.proc_status(worker)
    reset = common.reset_peak_rss(worker)
    sampler = common.RSSSampler(worker)
    sampler.start()
    lines = 0
    size = 0
    first = b""
    tail = b""
    started = time.perf_counter()
    first_byte = None
    with requests.get(
        base + "/api/recordings/export",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=(5, 120),
    ) as response:
        status = response.status_code
        for chunk in response.iter_content(64 * 1024):
            if first_byte is None:
                first_byte = time.perf_counter() - started
            size += len(chunk)
            lines += chunk.count(b"\n")
            if len(first) < 4096:
                first += chunk[:4096]
            tail = (tail + chunk)[-4096:]  # only the end, to parse the last row
    seconds = time.perf_counter() - started
    sampler.stop()
    after = common.proc_status(worker)
    return {
        "status": status,
        "lines": lines,
        "bytes": size,
        "seconds": round(seconds, 3),
        "first_byte_s": round(first_byte or 0, 3),
        "rss_before_mib": round(before.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mib": round(after.get("VmHWM", 0) / 1024, 1),
        "peak_reset": reset,
        "sampled_peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "rss_after_mib": round(after.get("VmRSS", 0) / 1024, 1),
        "first_row_ok": row_ok(
            params["format"], first.split(b"\n", 2)[1 if params["format"] == "csv" else 0]
        ),
        "last_row_ok": row_ok(params["format"], tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]),
        "csv_header_ok": params["format"] != "csv"
        or first.split(b"\n", 1)[0].decode().strip() == ",".join(EXPORT_COLUMNS),
    }


def row_ok(fmt: str, line: bytes) -> bool:
    """Whether one exported line is a whole recording of the data set."""
    text = line.decode(errors="replace")
    if fmt == "csv":
        fields = next(csv.reader([text]), [])
        return len(fields) == len(EXPORT_COLUMNS) and fields[0].startswith("bench-")
    try:
        row = json.loads(text)
    except ValueError:
        return False
    return isinstance(row, dict) and str(row.get("recording_id", "")).startswith("bench-")


def run(report: Report, args: argparse.Namespace) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from webhook.auth import add_staff
    from webhook.db import transaction
    from webhook.models import Role

    small = min(args.small, args.recordings)
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-export-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        url = stack.enter_context(common.temp_database("export", args.database_url))
        common.say(f"loading {args.recordings:,} recordings x {args.participants_per} …")
        report.results["load"] = dataset.load_dataset(url, args.recordings, args.participants_per)
        engine = create_engine(url)
        with transaction(sessionmaker(engine)) as session:
            token = add_staff(session, "bench-export", Role.COMPLIANCE)
        engine.dispose()
        port = common.free_port()
        env = common.service_env(
            work / "home",
            {
                "WEB_CONCURRENCY": "1",
                "DATABASE_URL": common.libpq_url(url),
                "ARCHIVE_URL": f"file://{work}/archive",
                # Configured for callbacks as a deployed service is, so /healthz answers 200.
                "PUBLIC_URL": f"http://127.0.0.1:{port}",
                "PLIVO_AUTH_ID": common.PLIVO_AUTH_ID,
                "PLIVO_AUTH_TOKEN": common.PLIVO_AUTH_TOKEN,
            },
        )
        web = common.start_gunicorn("gunicorn", port, env, work)
        stack.callback(web.stop)
        workers = common.gunicorn_workers(web, 1)
        if len(workers) != 1:
            raise RuntimeError(f"expected one gunicorn worker, found {workers}")
        worker = workers[0]
        base = f"http://127.0.0.1:{port}"
        since_small = since_for(url, small)
        # Warm the worker: the code paths and the connection pool, before any memory is read.
        for fmt in ("ndjson", "csv"):
            stream(base, token, {"format": fmt, "since": since_for(url, min(100, small))}, worker)
        for fmt in ("ndjson", "csv"):
            for label, params in (
                (f"{small:,} rows", {"since": since_small}),
                (f"all {args.recordings:,} rows", {}),
            ):
                results[f"{fmt}, {label}"] = stream(base, token, {"format": fmt, **params}, worker)
                results[f"{fmt}, {label}"]["expected_rows"] = small if params else args.recordings
                results[f"{fmt}, {label}"]["format"] = fmt

    rows = []
    for label, r in results.items():
        data_rows = r["lines"] - (1 if r["format"] == "csv" else 0)
        r["rows"] = data_rows
        rows.append(
            [
                label,
                data_rows,
                r["bytes"] / 1e6,
                r["seconds"],
                data_rows / r["seconds"] if r["seconds"] else 0.0,
                r["bytes"] / MIB / r["seconds"] if r["seconds"] else 0.0,
                r["first_byte_s"],
                r["rss_before_mib"],
                r["peak_rss_mib"],
                r["sampled_peak_rss_mib"],
            ]
        )
    report.table(
        "GET /api/recordings/export from gunicorn (1 worker), body read in 64 KiB chunks",
        [
            "export",
            "rows",
            "MB",
            "seconds",
            "rows/s",
            "MiB/s",
            "1st byte s",
            "RSS before MiB",
            "peak RSS MiB",
            "sampled peak",
        ],
        rows,
    )
    growth = {}
    for fmt in ("ndjson", "csv"):
        small_run = results[f"{fmt}, {small:,} rows"]
        full_run = results[f"{fmt}, all {args.recordings:,} rows"]
        growth[fmt] = round(full_run["peak_rss_mib"] - small_run["peak_rss_mib"], 1)
        common.say(
            f"{fmt}: worker peak RSS {small_run['peak_rss_mib']} MiB at {small:,} rows, "
            f"{full_run['peak_rss_mib']} MiB at {args.recordings:,} rows "
            f"(growth {growth[fmt]:+} MiB; peaks reset before each export: "
            f"{small_run['peak_reset'] and full_run['peak_reset']})"
        )
        report.target(
            f"{fmt}: peak RSS growth {small:,} → {args.recordings:,} rows (MiB)",
            growth[fmt],
            "flat (< 16)",
            growth[fmt] < 16,
        )
    report.results.update({"exports": results, "peak_rss_growth_mib": growth})
    for label, r in results.items():
        report.check(
            f"{label}: 200 with every row",
            r["status"] == 200 and r["rows"] == r["expected_rows"],
            f"{r['rows']} of {r['expected_rows']}",
        )
    report.check(
        "first and last row of every export parse as whole recordings (CSV header right)",
        all(
            r["first_row_ok"] and r["last_row_ok"] and r["csv_header_ok"] for r in results.values()
        ),
    )


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 600 + args.recordings / 200
    params = {
        "recordings": args.recordings,
        "participants_per": args.participants_per,
        "small": args.small,
        "server": "gunicorn (Procfile), WEB_CONCURRENCY=1",
    }
    common.run_main(lambda: Report("export", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
