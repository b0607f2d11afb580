"""Start-up: `create_app()` from a cold interpreter, N times, and the slowest imports.

    .venv/bin/python bench/startup.py [--runs 10]

Each run is a new `python -c` process (SQLite DATABASE_URL, local archive, as on a laptop) that
times `from webhook import create_app; create_app()` with perf_counter; the process's own wall
time (interpreter start included) is reported beside it. One unmeasured run first makes sure
the .pyc files exist. Then `python -X importtime` of the same code gives the top 10 imports by
cumulative time.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import common
from common import Report

CODE = (
    "import time; t = time.perf_counter(); from webhook import create_app; create_app(); "
    "print(time.perf_counter() - t)"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=None)
    return parser.parse_args()


def import_times(stderr: str) -> list[dict[str, object]]:
    """`-X importtime` lines as {module, depth, self_ms, cumulative_ms}."""
    entries = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
        name = name.removeprefix(" ")
        depth = (len(name) - len(name.lstrip(" "))) // 2
        entries.append(
            {
                "module": name.strip(),
                "depth": depth,
                "self_ms": int(self_us.strip()) / 1000,
                "cumulative_ms": int(cumulative_us.strip()) / 1000,
            }
        )
    return entries


def run(report: Report, args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        env = common.service_env(
            work / "home",
            {
                "DATABASE_URL": f"sqlite:///{work}/webhook.sqlite3",
                "ARCHIVE_URL": f"file://{work}/archive",
            },
        )
        argv = [sys.executable, "-c", CODE]
        first = common.run_measured(argv, env, timeout=120)
        runs = []
        for _ in range(args.runs):
            measured = common.run_measured(argv, env, timeout=120)
            if measured.returncode != 0:
                raise RuntimeError(f"create_app() failed:\n{measured.stderr}")
            runs.append(
                {
                    "create_app_s": float(measured.stdout.strip().splitlines()[-1]),
                    "process_s": measured.wall_s,
                    "peak_rss_mib": measured.maxrss_kib / 1024,
                }
            )
        traced = common.run_measured(
            [sys.executable, "-X", "importtime", "-c", CODE], env, timeout=120
        )
        bare = common.run_measured([sys.executable, "-c", "pass"], env, timeout=60)

    def stats(key: str) -> list[float]:
        values = [r[key] for r in runs]
        return [min(values), statistics.median(values), max(values)]

    report.table(
        f"create_app() from a cold interpreter, {args.runs} runs (SQLite, local archive)",
        ["measure", "min s", "median s", "max s"],
        [
            ["import webhook + create_app()", *stats("create_app_s")],
            ["whole process (python -c …)", *stats("process_s")],
            ["bare interpreter (python -c pass)", bare.wall_s, bare.wall_s, bare.wall_s],
        ],
    )
    imports = import_times(traced.stderr)
    top = sorted(imports, key=lambda e: e["cumulative_ms"], reverse=True)[:10]
    report.table(
        "python -X importtime: top 10 imports by cumulative time",
        ["module (indent = nesting)", "cumulative ms", "self ms"],
        [
            ["  " * int(e["depth"]) + str(e["module"]), e["cumulative_ms"], e["self_ms"]]
            for e in top
        ],
    )
    median = statistics.median(r["create_app_s"] for r in runs)
    report.results.update(
        {
            "create_app_s": dict(zip(("min", "median", "max"), stats("create_app_s"), strict=True)),
            "process_s": dict(zip(("min", "median", "max"), stats("process_s"), strict=True)),
            "bare_interpreter_s": round(bare.wall_s, 4),
            "first_run_s": float(first.stdout.strip().splitlines()[-1])
            if first.returncode == 0
            else None,
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            "top_imports": top,
        }
    )
    report.check(
        "every run built the app (exit 0)", first.returncode == 0 and len(runs) == args.runs
    )
    report.check("-X importtime produced a profile", bool(imports), f"{len(imports)} imports")
    report.target("create_app() median (s)", round(median, 3), "< 0.5", median < 0.5)


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 120 + args.runs * 20
    params = {"runs": args.runs, "database": "sqlite (temp file)", "archive": "file (temp dir)"}
    common.run_main(lambda: Report("startup", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
