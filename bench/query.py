"""Query: `GET /api/recordings` with each filter and with deep cursors over a large PostgreSQL
data set, p50/p95 over repeated requests, and the EXPLAIN (ANALYZE, BUFFERS) plan of the SQL the
app emits for each.

    .venv/bin/python bench/query.py [--recordings 1000000] [--participants-per 3] [--repeat 30]

Requests go through the Flask test client, in this process, against the real app
(`create_app()` on PostgreSQL, logging and the audit write included), so the times are the
app's and the database's without HTTP parsing. The SQL is captured with a
`before_cursor_execute` listener and explained with the very parameters it was run with.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import dataset
from common import Report

INDEX_USE = re.compile(r"(?:Index(?: Only)? Scan(?: Backward)? using|Bitmap Index Scan on) (\w+)")
SEQ_SCAN = re.compile(r"Seq Scan on (\w+)")
EXECUTION = re.compile(r"Execution Time: ([\d.]+) ms")
REMOVED = re.compile(r"Rows Removed by (?:Filter|Join Filter): (\d+)")
DAY_MS = 24 * 3600 * 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=1_000_000)
    parser.add_argument("--participants-per", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per case")
    parser.add_argument(
        "--transcript-words", type=int, default=400, help="words per transcript (0: none)"
    )
    parser.add_argument("--pages", type=int, default=100, help="deepest page followed")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--quiet-plans", action="store_true", help="do not print the plans")
    parser.add_argument(
        "--keep-database",
        metavar="NAME",
        help="load into database NAME and keep it; when it exists, measure its data again",
    )
    parser.add_argument(
        "--no-seqscan",
        action="store_true",
        help="explain with enable_seqscan off: at a small size, shows which indexes a plan can use",
    )
    return parser.parse_args()


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def phone(key: str) -> str:
    """A customer key `1415555NNNN` written the way a person would type it."""
    return f"+{key[0]} ({key[1:4]}) {key[4:7]}-{key[7:]}" if key.isdigit() else f"sip:{key}"


def pick_values(url: str, recordings: int) -> dict[str, Any]:
    """Filter values taken from the data: a typical and the busiest conference, a typical and
    the busiest participant, a week in the middle, a cursor 90% of the way down."""
    import psycopg

    with psycopg.connect(common.libpq_url(url)) as conn:

        def one(sql: str, *params: Any) -> Any:
            row = conn.execute(sql, params).fetchone()
            return row[0] if row else None

        conferences = conn.execute(
            "SELECT conference_name, count(*) FROM recordings GROUP BY 1 ORDER BY 2, 1"
        ).fetchall()
        customers = conn.execute(
            "SELECT from_key, count(*) FROM participants WHERE direction = 'inbound' "
            "AND from_key LIKE '1415%%' GROUP BY 1 ORDER BY 2, 1"
        ).fetchall()
        bridge = one(
            "SELECT to_key FROM participants WHERE direction = 'inbound' "
            "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        )
        middle = one(
            "SELECT start_ms FROM recordings ORDER BY id OFFSET %s LIMIT 1", recordings // 2
        )
        far = conn.execute(
            "SELECT start_ms, id FROM recordings ORDER BY start_ms DESC, id DESC OFFSET %s LIMIT 1",
            (int(recordings * 0.9),),
        ).fetchone()
        newest = one("SELECT max(start_ms) FROM recordings")
    return {
        "conference": conferences[len(conferences) // 2][0],
        "conference_rows": conferences[len(conferences) // 2][1],
        "conference_hot": conferences[-1][0],
        "conference_hot_rows": conferences[-1][1],
        "participant": phone(customers[len(customers) // 2][0]) if customers else "+1 415 555 0000",
        "participant_hot": phone(bridge) if bridge else "+1 800 555 0000",
        "since": iso(middle),
        "until": iso(middle + 7 * DAY_MS),
        "last_30_days": iso(newest - 30 * DAY_MS),
        "far_cursor": far,
    }


def goal_ms(label: str) -> int:
    """p95 goal of a case: 30 ms for the metadata filters (issues 3-5), 50 ms for a transcript
    search (`q=`, issue 11)."""
    return 50 if label.startswith("q ") else 30


def summarise_plan(plan: str) -> dict[str, Any]:
    execution = EXECUTION.search(plan)
    return {
        "indexes": sorted(set(INDEX_USE.findall(plan))),
        "seq_scans": sorted(set(SEQ_SCAN.findall(plan))),
        "rows_removed": sum(int(n) for n in REMOVED.findall(plan)),
        "execution_ms": float(execution[1]) if execution else None,
    }


def run(report: Report, args: argparse.Namespace) -> None:
    from sqlalchemy import event

    from webhook import create_app, services
    from webhook.auth import add_staff
    from webhook.config import load
    from webhook.db import transaction
    from webhook.models import Role
    from webhook.search import Cursor

    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-query-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if args.keep_database:
            url, existed = stack.enter_context(
                common.kept_database(args.keep_database, args.database_url)
            )
        else:
            url, existed = (
                stack.enter_context(common.temp_database("query", args.database_url)),
                False,
            )
        if existed:
            common.say(f"measuring the data already in {args.keep_database} again")
            loaded = dataset.counts(url)
            report.results["reused_database"] = {"name": args.keep_database, **loaded}
        else:
            common.say(f"loading {args.recordings:,} recordings x {args.participants_per} …")
            loaded = dataset.load_dataset(url, args.recordings, args.participants_per)
            common.say(f"loaded: {loaded}")
            report.results["load"] = loaded
        if args.transcript_words and not existed:
            common.say(f"transcripts of {args.transcript_words} words …")
            report.results["transcripts"] = dataset.load_transcripts(url, args.transcript_words)
            common.say(f"loaded: {report.results['transcripts']}")
        values = pick_values(url, args.recordings)
        report.results["values"] = {k: v for k, v in values.items() if k != "far_cursor"}

        settings = load(
            str(work / "instance"),
            {"DATABASE_URL": url, "ARCHIVE_URL": f"file://{work}/archive"},
        )
        app = create_app({"SETTINGS": settings})
        svc = services(app)
        stack.callback(svc.engine.dispose)
        log_file = stack.enter_context((work / "app.log").open("w"))
        for handler in logging.getLogger("webhook").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(log_file)  # the JSON request lines are written, not shown
        with transaction(svc.sessions) as session:
            token = add_staff(session, f"bench-compliance-{uuid.uuid4().hex[:8]}", Role.COMPLIANCE)
        headers = {"Authorization": f"Bearer {token}"}
        captured: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            captured.append((statement, parameters))

        event.listen(svc.engine, "before_cursor_execute", capture)
        client = app.test_client()

        def get(params: dict[str, str]) -> dict[str, Any]:
            response = client.get("/api/recordings", query_string=params, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{params}: {response.status_code} {response.get_data()!r}")
            body: dict[str, Any] = response.get_json()
            return body

        far_start, far_id = values["far_cursor"]
        since_ms = int(dt.datetime.fromisoformat(values["since"]).timestamp() * 1000)
        until_ms = int(dt.datetime.fromisoformat(values["until"]).timestamp() * 1000)
        conference, hot = values["conference"], values["conference_hot"]
        Check = Callable[[dict[str, Any]], bool] | None
        cases: list[tuple[str, dict[str, str], Check]] = [
            ("no filter", {}, None),
            ("no filter, limit=200", {"limit": "200"}, None),
            (
                f"conference ({values['conference_rows']} rows)",
                {"conference": conference},
                lambda r: r["conference_name"] == conference,
            ),
            (
                f"conference, busiest ({values['conference_hot_rows']} rows)",
                {"conference": hot},
                lambda r: r["conference_name"] == hot,
            ),
            (
                "conference_prefix (a department)",
                {"conference_prefix": "trading/"},
                lambda r: r["conference_name"].startswith("trading/"),
            ),
            (
                "conference_prefix (narrow)",
                {"conference_prefix": "trading/room-00"},
                lambda r: r["conference_name"].startswith("trading/room-00"),
            ),
            ("participant (typical customer)", {"participant": values["participant"]}, None),
            ("participant (bridge number)", {"participant": values["participant_hot"]}, None),
            (
                "since/until (one week)",
                {"since": values["since"], "until": values["until"]},
                lambda r: since_ms <= r["start_ms"] < until_ms,
            ),
            ("since (last 30 days)", {"since": values["last_30_days"]}, None),
            ("status=failed", {"status": "failed"}, lambda r: r["status"] == "failed"),
            ("status=pending", {"status": "pending"}, lambda r: r["status"] == "pending"),
            (
                "min_duration=3600",
                {"min_duration": "3600"},
                lambda r: r["duration_ms"] >= 3_600_000,
            ),
            ("legal_hold=true", {"legal_hold": "true"}, lambda r: r["legal_hold"] is True),
            # Worst cases: a filter the index on start_ms cannot serve, matching little or nothing.
            (
                "conference_prefix (matches nothing)",
                {"conference_prefix": "no-such-department/"},
                lambda r: False,
            ),
            (
                "min_duration=7000 (rare)",
                {"min_duration": "7000"},
                lambda r: r["duration_ms"] >= 7_000_000,
            ),
            (
                "conference (busiest) + since",
                {"conference": hot, "since": values["since"]},
                lambda r: r["conference_name"] == hot and r["start_ms"] >= since_ms,
            ),
        ]
        if args.transcript_words:

            def snippet(r: dict[str, Any]) -> bool:
                return "«" in (r.get("snippet") or "")

            cases += [
                (f"q rare word ({dataset.RARE_WORD})", {"q": dataset.RARE_WORD}, snippet),
                ("q common word (the)", {"q": "the"}, snippet),
                ("q middling word (collateral)", {"q": "collateral"}, snippet),
                (f'q phrase ("{dataset.RARE_PHRASE}")', {"q": f'"{dataset.RARE_PHRASE}"'}, snippet),
                ("q OR and -word", {"q": "hedge OR swap -london"}, snippet),
                (
                    "q word + participant + since/until",
                    {
                        "q": "collateral",
                        "participant": values["participant_hot"],
                        "since": values["since"],
                        "until": values["until"],
                    },
                    lambda r: snippet(r) and since_ms <= r["start_ms"] < until_ms,
                ),
                (
                    "q phrase + since (last 30 days)",
                    {"q": f'"{dataset.RARE_PHRASE}"', "since": values["last_30_days"]},
                    snippet,
                ),
            ]

        # Deep cursors: follow next_cursor page after page, keeping a few cursors on the way.
        cursors: dict[int, str] = {}
        seen: set[str] = set()
        previous: int | None = None
        ordered = True
        cursor: str | None = None
        page_times: list[float] = []
        for page in range(1, args.pages + 1):
            if page in (10, args.pages) and cursor:
                cursors[page] = cursor
            started = time.perf_counter()
            body = get({"cursor": cursor} if cursor else {})
            page_times.append(time.perf_counter() - started)
            for recording in body["recordings"]:
                ordered &= recording["recording_id"] not in seen and (
                    previous is None or recording["start_ms"] <= previous
                )
                seen.add(recording["recording_id"])
                previous = recording["start_ms"]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        pages_followed = page
        for page, page_cursor in sorted(cursors.items()):
            cases.append((f"page {page} (following next_cursor)", {"cursor": page_cursor}, None))
        far_cursor = Cursor(far_start, far_id).encode()
        cases.append(
            ("cursor 90% deep", {"cursor": far_cursor}, lambda r: r["start_ms"] <= far_start)
        )

        rows = []
        plans: dict[str, str] = {}
        case_results: dict[str, Any] = {}
        all_ok = True
        for label, params, predicate in cases:
            for _ in range(2):
                get(params)  # warm: statement cache, buffers
            captured.clear()
            body = get(params)
            statements = list(captured)
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                get(params)
                times.append(time.perf_counter() - started)
            if predicate is not None and not all(predicate(r) for r in body["recordings"]):
                all_ok = False
                report.check(f"{label}: every row matches the filter", False)
            main = next(
                (s for s in statements if "FROM recordings" in s[0] and "ORDER BY" in s[0]),
                None,
            )
            plan = explain(svc.engine, *main, args.no_seqscan) if main else "(query not captured)"
            # The participants of the page, with their members' notice state.
            loading = next(
                (s for s in statements if s[0].startswith("SELECT participants.recording_pk")),
                None,
            )
            if loading and "participant" in label:
                plans[f"{label}: loading participants"] = explain(
                    svc.engine, *loading, args.no_seqscan
                )
                case_results[f"{label}: loading participants"] = {
                    "sql": loading[0],
                    **summarise_plan(plans[f"{label}: loading participants"]),
                }
            plans[label] = plan
            summary = summarise_plan(plan)
            timing = common.summary_ms(times)
            case_results[label] = {
                "params": params,
                "rows": len(body["recordings"]),
                "latency_ms": timing,
                "statements_per_request": len(statements),
                "sql": main[0] if main else None,
                **summary,
            }
            rows.append(
                [
                    label,
                    len(body["recordings"]),
                    timing["p50"],
                    timing["p95"],
                    summary["execution_ms"] if summary["execution_ms"] is not None else "-",
                    len(statements),
                    ",".join(i.removeprefix("ix_") for i in summary["indexes"]) or "-",
                    ",".join(summary["seq_scans"]) or "-",
                    summary["rows_removed"],
                    timing["p95"] < goal_ms(label),
                ]
            )
            report.target(
                f"p95 {label} (ms)",
                timing["p95"],
                f"< {goal_ms(label)}",
                timing["p95"] < goal_ms(label),
            )
        report.table(
            f"GET /api/recordings, Flask test client in-process, {loaded['recordings']:,} "
            f"recordings / {loaded['participants']:,} participants, {args.repeat} timed requests "
            "each",
            [
                "case",
                "rows",
                "p50 ms",
                "p95 ms",
                "SQL ms",
                "stmts",
                "indexes used (ix_ dropped)",
                "seq scan",
                "rows filtered",
                "p95 < goal",
            ],
            rows,
        )
        following = common.summary_ms(page_times)
        common.say(
            f"\nfollowing next_cursor through {pages_followed} pages: p50 {following['p50']} ms, "
            f"p95 {following['p95']} ms per page"
        )
        if not args.quiet_plans:
            for label, plan in plans.items():
                common.say(f"\n--- plan: {label}\n{case_results[label]['sql']}\n{plan}")
        report.results["cases"] = case_results
        report.results["following_next_cursor"] = {"pages": pages_followed, **following}
        report.check("every request answered 200 (no error raised)", True)
        report.check("every returned row matches its filter", all_ok)
        report.check(
            f"{pages_followed} pages followed by cursor: newest first, no row twice",
            ordered and len(seen) == min(pages_followed * 50, loaded["recordings"]),
            f"{len(seen)} distinct rows",
        )
        report.check(
            "data set loaded in full",
            loaded["recordings"] == args.recordings
            and loaded["participants"] == args.recordings * args.participants_per,
        )
        misses = [
            label
            for label, r in case_results.items()
            if "latency_ms" in r and r["latency_ms"]["p95"] >= goal_ms(label)
        ]
        no_index = [label for label, r in case_results.items() if not r["indexes"]]
        if misses:
            report.note("p95 at or over its goal: " + "; ".join(misses))
        if no_index:
            report.note("plans without an index: " + "; ".join(no_index))


def explain(engine: Any, statement: str, parameters: Any, no_seqscan: bool = False) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of a captured statement with the parameters it ran with."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if no_seqscan:
            cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        raw.rollback()
        return plan
    finally:
        raw.close()


def main() -> None:
    args = parse_args()
    timeout = args.timeout or 900 + args.recordings / 1000
    params = {
        "recordings": args.recordings,
        "participants_per": args.participants_per,
        "repeat": args.repeat,
        "pages": args.pages,
        "transcript_words": args.transcript_words,
        "client": "Flask test client, in-process",
    }
    common.run_main(lambda: Report("query", params), lambda r: run(r, args), timeout)


if __name__ == "__main__":
    main()
