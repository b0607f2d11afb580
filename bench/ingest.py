"""Callback ingest: signed, unique recording callbacks against gunicorn serving the app on
PostgreSQL, side by side with the reference (`bench/ref_ingest_app.py`: the least work that keeps
the callback contract, one statement on a raw psycopg connection) and an empty Flask endpoint, all
under exactly the same gunicorn settings.

    .venv/bin/python bench/ingest.py [--callbacks 10000] [--connections 32] [--workers N]
        [--generator auto|wrk|python] [--gunicorn-args "--worker-class gthread --threads 4"]

gunicorn runs the Procfile's web command (bound to 127.0.0.1), WEB_CONCURRENCY workers (default:
the environment's WEB_CONCURRENCY, else nproc); `--gunicorn-args` goes to both servers through
GUNICORN_CMD_ARGS. Each request is sent exactly once, over `--connections` concurrent connections
(kept alive when the server allows it). To show that the load generator is not the bottleneck it
is also run alone against a raw socket server that answers a fixed 200, and its own CPU time is
reported. Afterwards the database must hold exactly the callbacks sent.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import NamedTuple

import common
import loadgen
from common import Report
from loadgen import LoadResult

# The reference app, as gunicorn is told to load it (bench/ is on its PYTHONPATH).
REFERENCE_APP = "ref_ingest_app:create_app()"


class Measured(NamedTuple):
    """One server's run in a round."""

    result: LoadResult
    rows: dict[str, int]  # what the database held afterwards (wait_for_rows)
    peak_rss: list[int]  # each gunicorn worker's VmHWM, KiB
    cpu: dict[str, float]  # CPU seconds used during the load: "web", "postgresql"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=10000, help="callbacks sent to each")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=common.default_workers())
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--gunicorn-args", default="", help="extra settings for both servers")
    parser.add_argument("--warmup", type=int, default=50, help="callbacks before measuring")
    parser.add_argument(
        "--rounds", type=int, default=5, help="reference and app runs, alternating who goes first"
    )
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to use")
    parser.add_argument("--timeout", type=float, default=None, help="hard limit, seconds")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def build_callbacks(public_url: str, tag: str, prefix: str, count: int) -> list[bytes]:
    """`count` distinct recordings' callbacks, each with its own nonce, signed over PUBLIC_URL."""
    host = public_url.removeprefix("http://")
    start_ms = 1_767_225_600_000
    requests = []
    for i in range(count):
        recording_id = f"{prefix}-{tag}-{i:07d}"
        params = common.callback_params(
            recording_id,
            f"https://media.plivo.com/v1/Account/{common.PLIVO_AUTH_ID}/Recording/"
            f"{recording_id}.mp3",
            f"sales/room-{i % 5000:04d}",
            start_ms + i * 1000,
            60_000 + (i * 7919) % 3_600_000,
        )
        nonce = f"{uuid.uuid4().int % 10**20:020d}"
        requests.append(
            common.signed_callback(public_url, params, nonce, host, common.PLIVO_AUTH_TOKEN)
        )
    return requests


def server_settings(url: str, public_url: str, work: Path, workers: int) -> dict[str, str]:
    """The environment every server of the benchmark gets: the benchmark's database, Plivo's
    test credentials, a local archive, `workers` gunicorn workers."""
    return {
        "WEB_CONCURRENCY": str(workers),
        # For the reference and the empty endpoint; the service does not mind it.
        "PYTHONPATH": str(common.BENCH),
        "DATABASE_URL": common.libpq_url(url),
        "PUBLIC_URL": public_url,
        "PLIVO_AUTH_ID": common.PLIVO_AUTH_ID,
        "PLIVO_AUTH_TOKEN": common.PLIVO_AUTH_TOKEN,
        "ARCHIVE_URL": f"file://{work}/archive",
        "RECORDING_HOSTS": "127.0.0.1",
    }


def result_row(label: str, result: LoadResult) -> list[object]:
    return [
        label,
        result.generator,
        result.connections,
        result.requests,
        result.rps,
        result.latency_ms["p50"],
        result.latency_ms["p90"],
        result.latency_ms["p99"],
        result.latency_ms["max"],
        result.non_200 + result.socket_errors,
        result.generator_cpu_s,
        round(result.generator_cpu_s / max(result.completed, 1) * 1e6, 1),
        "no" if result.server_closes else "yes",
    ]


def run(report: Report, args: argparse.Namespace) -> None:
    generator = loadgen.choose_generator(args.generator)
    report.params["generator"] = generator
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        url = stack.enter_context(common.temp_database("ingest", args.database_url))
        port = common.free_port()
        public_url = f"http://127.0.0.1:{port}"
        tag = uuid.uuid4().hex[:8]
        warmup = build_callbacks(public_url, tag, "warm", args.warmup)
        callbacks = build_callbacks(public_url, tag, "bench", args.callbacks)
        settings = server_settings(url, public_url, work, args.workers)
        if args.gunicorn_args:
            settings["GUNICORN_CMD_ARGS"] = args.gunicorn_args
        env = common.service_env(work / "home", settings)
        report.results["gunicorn"] = {
            "argv": common.gunicorn_argv(port)[1:],
            "WEB_CONCURRENCY": args.workers,
            "GUNICORN_CMD_ARGS": args.gunicorn_args or None,
        }

        # 1. The empty endpoint: the ceiling of gunicorn + Flask with these settings.
        empty = common.start_gunicorn(
            "gunicorn-empty", port, env, work, "empty_app:create_app()", "/"
        )
        try:
            common.gunicorn_workers(empty, args.workers)
            loadgen.send_load(port, warmup, args.connections, "python", work)
            empty_result = loadgen.send_load(
                port, callbacks, args.connections, generator, work, timeout=args.timeout
            )
        finally:
            empty.stop()

        # 2. The generator alone, in the same keep-alive mode the server answered in.
        alone = loadgen.calibrate_generator(
            callbacks, args.connections, generator, empty_result.server_closes, work, work
        )

        # 3 and 4. The reference (the contract kept with the least work) and the service, in
        # rounds that alternate which goes first, each on fresh callbacks and a settled database
        # (checkpointed and vacuumed), so that neither pays for the other's writes.
        apps = {
            "reference": ("gunicorn-reference", REFERENCE_APP, "/"),
            "app": ("gunicorn-app", None, "/healthz"),
        }
        postmaster = common.postmaster_pid(url)
        rounds: list[dict[str, Measured]] = []
        for number in range(args.rounds):
            measured: dict[str, Measured] = {}
            order = ["reference", "app"] if number % 2 == 0 else ["app", "reference"]
            for which in order:
                name, spec, ready = apps[which]
                run_tag = f"{tag}{which[0]}{number}"
                settle_database(url)
                server = common.start_gunicorn(name, port, env, work, spec, ready)
                try:
                    workers = common.gunicorn_workers(server, args.workers)
                    loadgen.send_load(
                        port,
                        build_callbacks(public_url, run_tag, "warm", args.warmup),
                        args.connections,
                        "python",
                        work,
                        ["accepted"],
                    )
                    load = build_callbacks(public_url, run_tag, "bench", args.callbacks)
                    web_cpu = common.CPUSampler(functools.partial(list, workers))
                    database_pids = functools.partial(common.postgres_pids, postmaster)
                    database_cpu = common.CPUSampler(database_pids)
                    web_cpu.start()
                    database_cpu.start()
                    result = loadgen.send_load(
                        port,
                        load,
                        args.connections,
                        generator,
                        work,
                        ["accepted", "duplicate"],
                        timeout=args.timeout,
                    )
                    cpu = {"web": web_cpu.stop(), "postgresql": database_cpu.stop()}
                    rows = wait_for_rows(url, run_tag, args.warmup + args.callbacks)
                    rss = [common.proc_status(pid).get("VmHWM", 0) for pid in workers]
                finally:
                    server.stop()
                measured[which] = Measured(result, rows, rss, cpu)
            rounds.append(measured)

    # The round whose ratio is the median stands for the run; every round is shown.
    ratios = [r["app"].result.rps / max(r["reference"].result.rps, 1e-9) for r in rounds]
    middle = rounds[common.median_index(ratios)]
    app_result, counts, peak_rss, _ = middle["app"]
    ref_result, ref_counts, _, _ = middle["reference"]
    ratio = app_result.rps / empty_result.rps if empty_result.rps else float("nan")
    ratio_ref = app_result.rps / ref_result.rps if ref_result.rps else float("nan")
    p99_ratio = app_result.latency_ms["p99"] / max(ref_result.latency_ms["p99"], 1e-3)
    header = [
        "endpoint",
        "gen",
        "conns",
        "requests",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "gen CPU s",
        "gen µs/req",
        "keep-alive",
    ]
    report.table(
        f"callback ingest, gunicorn {args.workers} worker(s)"
        + (f" {args.gunicorn_args}" if args.gunicorn_args else " (Procfile settings)"),
        header,
        [
            result_row("generator alone (raw socket server)", alone),
            result_row("empty Flask endpoint", empty_result),
            *[
                row
                for number, measured in enumerate(rounds, 1)
                for row in (
                    result_row(
                        f"reference (contract, raw psycopg), round {number}",
                        measured["reference"].result,
                    ),
                    result_row(f"webhook app (PostgreSQL), round {number}", measured["app"].result),
                )
            ],
        ],
    )

    def per_callback_us(measured: Measured, where: str) -> float:
        return 1e6 * measured.cpu[where] / max(measured.result.completed, 1)

    report.table(
        "server CPU per callback, µs (gunicorn's workers; the PostgreSQL server's processes)",
        ["round", "reference web", "reference PostgreSQL", "app web", "app PostgreSQL"],
        [
            [
                number,
                *(
                    f"{per_callback_us(measured[which], where):.0f}"
                    for which in ("reference", "app")
                    for where in ("web", "postgresql")
                ),
            ]
            for number, measured in enumerate(rounds, 1)
        ],
    )

    def share(result: LoadResult) -> float:
        return result.generator_cpu_s / result.window_s if result.window_s else 0.0

    per_request_us = 1e6 * empty_result.generator_cpu_s / max(empty_result.completed, 1)
    common.say(
        "\nratio app/reference by round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"; the median round: {ratio_ref:.2f} (p99 {p99_ratio:.2f}x the reference's), "
        f"app/empty = {ratio:.2f}. Load generator: alone against the raw server it "
        f"reached {alone.rps:,.0f} req/s ({alone.rps / max(empty_result.rps, 1):.1f}x the empty "
        f"endpoint; the raw server is the limit there); it spent {per_request_us:.0f} µs of CPU "
        f"per request, i.e. one core could send ≈{1e6 / max(per_request_us, 1e-3):,.0f} req/s, "
        f"and it used {share(empty_result):.0%} of one core during the empty run, "
        f"{share(app_result):.0%} during the app run"
    )
    common.say(
        f"database: {counts['bench']} benchmark recordings (+{counts['warm']} warm-up), "
        f"{counts['callback_log']} callback_log rows; app worker peak RSS "
        f"{', '.join(f'{kib / 1024:.0f} MiB' for kib in peak_rss)}"
    )
    report.results.update(
        {
            "generator_alone": alone.brief(),
            "empty": empty_result.brief(),
            "reference": ref_result.brief(),
            "app": app_result.brief(),
            "rounds": [
                {
                    "reference": measured["reference"].result.brief(),
                    "app": measured["app"].result.brief(),
                    "ratio": round(ratio, 3),
                    "server_cpu_us_per_callback": {
                        which: {
                            where: round(per_callback_us(measured[which], where))
                            for where in ("web", "postgresql")
                        }
                        for which in ("reference", "app")
                    },
                }
                for measured, ratio in zip(rounds, ratios, strict=True)
            ],
            "ratio_app_reference": round(ratio_ref, 3),
            "p99_app_over_reference": round(p99_ratio, 3),
            "ratio_app_empty": round(ratio, 3),
            "generator_cpu_share_of_one_core": {
                "empty": round(share(empty_result), 3),
                "app": round(share(app_result), 3),
            },
            "database": counts,
            "reference_database": ref_counts,
            "app_worker_peak_rss_mib": [round(kib / 1024, 1) for kib in peak_rss],
        }
    )
    report.check(
        "empty endpoint answered every request 200",
        empty_result.non_200 == 0 and empty_result.socket_errors == 0,
        f"statuses {empty_result.statuses}, socket errors {empty_result.socket_errors}",
    )
    report.check(
        "app answered every callback 200",
        app_result.non_200 == 0 and app_result.socket_errors == 0,
        f"statuses {app_result.statuses}, socket errors {app_result.socket_errors}",
    )
    stored_once = all(
        measured["app"].rows["bench"] == args.callbacks
        and measured["app"].rows["warm"] == args.warmup
        and measured["app"].rows["callback_log"] == args.callbacks + args.warmup
        for measured in rounds
    )
    report.check(
        "database holds exactly the callbacks sent, in every round",
        stored_once,
        f"{counts['bench']} of {args.callbacks} recordings, {counts['callback_log']} log rows",
    )
    report.check(
        "reference answered every callback 200 and stored each once",
        ref_result.non_200 == 0
        and ref_result.socket_errors == 0
        and ref_counts["bench"] == args.callbacks,
        f"statuses {ref_result.statuses}, {ref_counts['bench']} of {args.callbacks} recordings",
    )
    report.check(
        "every callback the generator saw answered was a new recording",
        app_result.markers.get("accepted", 0) == app_result.completed
        and app_result.markers.get("duplicate", 0) == 0,
        f"{app_result.markers} of {app_result.completed} answers seen",
    )
    report.target("app/reference throughput", round(ratio_ref, 2), ">= 0.8", ratio_ref >= 0.8)
    report.target("app p99 over the reference's", round(p99_ratio, 2), "<= 1.5", p99_ratio <= 1.5)


def wait_for_rows(url: str, tag: str, expected: int, timeout: float = 60.0) -> dict[str, int]:
    """The rows the run left, once every callback still in flight has been handled."""
    import time

    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(common.libpq_url(url), autocommit=True) as conn:
        while True:
            row = conn.execute(
                """
                SELECT (SELECT count(*) FROM recordings WHERE recording_id LIKE %(bench)s),
                       (SELECT count(*) FROM recordings WHERE recording_id LIKE %(warm)s),
                       (SELECT count(*) FROM callback_log
                        WHERE recording_id LIKE %(bench)s OR recording_id LIKE %(warm)s),
                       (SELECT count(DISTINCT nonce) FROM callback_log
                        WHERE recording_id LIKE %(bench)s OR recording_id LIKE %(warm)s)
                """,
                {"bench": f"bench-{tag}-%", "warm": f"warm-{tag}-%"},
            ).fetchone()
            assert row is not None
            if row[0] + row[1] >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    return dict(zip(("bench", "warm", "callback_log", "nonces"), row, strict=True))


def settle_database(url: str) -> None:
    """Write out what earlier runs left in memory and vacuum their tables, so that the next run
    starts from the same state whoever ran before it."""
    import psycopg

    with psycopg.connect(common.libpq_url(url), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        conn.execute("VACUUM (ANALYZE) recordings, callback_log")


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 300 + args.callbacks * 0.05
    args.timeout = timeout
    params = {
        "callbacks": args.callbacks,
        "connections": args.connections,
        "workers": args.workers,
        "gunicorn_args": args.gunicorn_args,
        "warmup": args.warmup,
    }
    common.run_main(lambda: Report("ingest", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
