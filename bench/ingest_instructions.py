"""Callback ingest in instructions: the CPU instructions one callback costs a gunicorn worker of
the app and of the reference (`bench/ref_ingest_app.py`), counted by valgrind's callgrind.

    .venv/bin/python bench/ingest_instructions.py [--callbacks 1000] [--connections 16]

`bench/ingest.py` measures requests per second, which on a shared machine moves by a third from
one round to the next. An instruction count barely moves: the same code given the same callbacks
runs the same instructions whatever else the machine does, but for how the concurrent requests
happen to interleave (runs of the same size agree within 0.5 %). Each server runs the
Procfile's web command with one worker under callgrind, counting only while the measured
callbacks are sent (not the start, nor the warm-up); the worker's count is divided by the
callbacks. It counts what runs in the worker (gunicorn, Flask, the service or the reference,
psycopg), not PostgreSQL's work nor the kernel's. Needs valgrind
(`apt-get install -y valgrind`).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import common
import loadgen
from common import Report
from ingest import REFERENCE_APP, build_callbacks, server_settings, wait_for_rows

# callgrind runs a program some fifty times slower than it runs alone.
SLOWDOWN = 50


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=1000, help="measured callbacks each")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=200, help="callbacks before counting")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to use")
    parser.add_argument("--timeout", type=float, default=None, help="hard limit, seconds")
    return parser.parse_args()


def callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def counted(out_dir: Path, pid: int) -> int:
    """The instructions callgrind counted in process `pid` (its dumps' totals)."""
    total = 0
    dumps = [out_dir / f"callgrind.out.{pid}", *out_dir.glob(f"callgrind.out.{pid}.*")]
    for dump in (path for path in dumps if path.exists()):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def measure(
    name: str,
    app_spec: str | None,
    env: dict[str, str],
    work: Path,
    port: int,
    warmup: list[bytes],
    callbacks: list[bytes],
    connections: int,
) -> tuple[int, loadgen.LoadResult]:
    """Instructions per callback in the one worker of a gunicorn run under callgrind."""
    out_dir = work / name
    out_dir.mkdir()
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
        *common.gunicorn_argv(port, app_spec),
    ]
    server = common.Service(name, argv, env, work)
    try:
        common.wait_http(f"http://127.0.0.1:{port}/", 360, server)
        (worker,) = common.gunicorn_workers(server, 1, timeout=120)
        loadgen.send_load(port, warmup, connections, "python", work)
        callgrind("--instr=on", str(worker))
        result = loadgen.send_load(port, callbacks, connections, "python", work)
        callgrind("--instr=off", str(worker))
        callgrind("--dump", str(worker))
    finally:
        server.stop(grace=60)
    return counted(out_dir, worker) // len(callbacks), result


def run(report: Report, args: argparse.Namespace) -> None:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install -y valgrind)")
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        url = stack.enter_context(common.temp_database("instructions", args.database_url))
        port = common.free_port()
        public_url = f"http://127.0.0.1:{port}"
        settings = {
            **server_settings(url, public_url, work, workers=1),
            "PYTHONHASHSEED": "0",  # the same hashing, so the same work, in every run
            # Under callgrind a request takes far longer than gunicorn's default 30 s allows.
            "GUNICORN_CMD_ARGS": "--timeout 600",
        }
        env = common.service_env(work / "home", settings)
        figures: dict[str, int] = {}
        for name, spec in (("reference", REFERENCE_APP), ("app", None)):
            tag = uuid.uuid4().hex[:8]
            warmup = build_callbacks(public_url, tag, "warm", args.warmup)
            callbacks = build_callbacks(public_url, tag, "bench", args.callbacks)
            per_callback, result = measure(
                name, spec, env, work, port, warmup, callbacks, args.connections
            )
            figures[name] = per_callback
            report.check(
                f"{name} answered every callback 200",
                result.statuses == {"200": args.callbacks} and not result.socket_errors,
                f"statuses {result.statuses}, socket errors {result.socket_errors}",
            )
            sent = args.warmup + args.callbacks
            rows = wait_for_rows(url, tag, sent)
            stored = rows["bench"] + rows["warm"]
            report.check(
                f"{name} stored each callback once",
                stored == sent == rows["callback_log"] == rows["nonces"],
                f"{stored} of {sent} recordings, {rows['callback_log']} log rows",
            )
            report.check(f"callgrind counted the {name}'s worker", per_callback > 0)
        ratio = round(figures["app"] / figures["reference"], 3) if figures["reference"] else 0.0
        report.results["instructions_per_callback"] = figures
        report.results["app_over_reference"] = ratio
        report.table(
            "instructions per callback in the gunicorn worker (callgrind)",
            ["server", "instructions"],
            [("reference (contract, raw psycopg)", figures["reference"]), ("app", figures["app"])],
        )
        report.note(f"app/reference = {ratio:.3f} in instructions per callback")


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 900 + (args.callbacks + args.warmup) * 2 * 0.0015 * SLOWDOWN
    params = {
        "callbacks": args.callbacks,
        "connections": args.connections,
        "warmup": args.warmup,
    }
    common.run_main(lambda: Report("ingest_instructions", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
