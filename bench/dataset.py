"""A large, realistic data set of recordings and participants, generated inside PostgreSQL."""

from __future__ import annotations

import time

from common import libpq_url

DATA_END_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the data set does not move with the clock
DATA_SPAN_MS = 3 * 365 * 24 * 3600 * 1000
DEPARTMENTS = (
    "sales", "support", "trading", "compliance", "legal", "ops", "finance", "hr", "research",
    "marketing", "desk-emea", "desk-apac", "desk-us", "treasury", "risk", "audit", "it",
    "board", "partners", "training",
)  # fmt: skip
CONFERENCE_POOL = 5000
CUSTOMER_POOL = 50_000
BRIDGE_NUMBERS = 20


def load_dataset(url: str, recordings: int, participants_per: int, seed: float = 0.42) -> dict:
    """Fill the database with `recordings` realistic recordings and their participants, fast:
    generated inside PostgreSQL (INSERT … SELECT generate_series, no client round trips), with
    the secondary indexes dropped during the load and re-created from their own definitions.

    Conference names come from a skewed pool of ~5000 (`<department>/room-NNNN`); start times
    span three years ending 2026-01-01, increasing with the id as an append-only table does;
    durations 30 s to 2 h, most short; 97% archived, 1.5% failed, 1% pending, 0.5% recording;
    0.1% under legal hold. Participants: customers from a skewed pool of 50 000 numbers (5% SIP
    addresses) calling one of 20 bridge numbers (80% inbound, 20% outbound), each a copy of a
    conference member (one member per participant, as a recording's members are), joined up to
    a minute before the recording started (from a member event) and left after it ended.
    """
    import psycopg

    departments = "ARRAY[" + ",".join(f"'{d}'" for d in DEPARTMENTS) + "]"
    step = DATA_SPAN_MS / max(recordings, 1)
    timings: dict[str, float] = {}
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        started = time.perf_counter()
        indexes = conn.execute(
            """
            SELECT i.indexname, i.indexdef FROM pg_indexes i
            WHERE i.tablename IN ('recordings', 'participants', 'conference_members')
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)
            """
        ).fetchall()
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            # Replica mode skips FK checks and triggers: the rows are consistent by construction.
            conn.execute("SET LOCAL session_replication_role = replica")
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute("SELECT setseed(%s)", (seed,))
            conn.execute(
                f"""
                INSERT INTO recordings (
                    recording_id, conference_name, api_id, record_url, file_format, duration_s,
                    duration_ms, start_ms, end_ms, status, attempts, next_attempt_at, lease_token,
                    last_error, archive_key, archive_size, archive_sha256, archive_version_id,
                    archived_at, retain_until, legal_hold, legal_hold_reason, started_by,
                    created_at, updated_at, conference_uuid)
                SELECT
                    rid, conf, md5(rid || 'api'),
                    'https://media.plivo.com/v1/Account/MABENCH/Recording/' || rid || '.' || fmt,
                    fmt, dur / 1000, dur, st, st + dur, status,
                    CASE WHEN status IN ('archived', 'failed') THEN 1 ELSE 0 END,
                    CASE WHEN status = 'pending' THEN to_timestamp((st + dur) / 1000.0) END,
                    NULL,
                    CASE WHEN status = 'failed' THEN 'MediaError: media host answered 500' END,
                    'recordings/' || to_char(to_timestamp(st / 1000.0) AT TIME ZONE 'UTC',
                    'YYYY/MM/DD') || '/' || rid || '.' || fmt,
                    CASE WHEN status = 'archived' THEN dur * 16 END,
                    CASE WHEN status = 'archived' THEN md5(rid) || md5(rid || 'x') END,
                    NULL,
                    CASE WHEN status = 'archived' THEN to_timestamp((st + dur + 60000) / 1000.0)
                    END,
                    NULL, hold, CASE WHEN hold THEN 'litigation 2025-17' END,
                    CASE WHEN r_started < 0.3 THEN 'operator-' || mod(i, 7) END,
                    to_timestamp((st + dur) / 1000.0), to_timestamp((st + dur + 60000) / 1000.0),
                    md5(rid || 'conference')
                FROM (
                    SELECT i,
                        'bench-' || lpad(i::text, 9, '0') AS rid,
                        ({departments})[1 + mod(k, 20)] || '/room-' || lpad(k::text, 4, '0')
                            AS conf,
                        CASE WHEN r_fmt < 0.05 THEN 'wav' ELSE 'mp3' END AS fmt,
                        (30000 + floor(7170000 * r_dur ^ 3))::bigint AS dur,
                        ({DATA_END_MS - DATA_SPAN_MS}::bigint
                            + floor((i - 1 + r_jit * 0.999) * {step}))::bigint AS st,
                        CASE WHEN r_status < 0.97 THEN 'archived'
                             WHEN r_status < 0.985 THEN 'failed'
                             WHEN r_status < 0.995 THEN 'pending'
                             ELSE 'recording' END AS status,
                        r_hold < 0.001 AS hold,
                        r_started
                    FROM (
                        SELECT i, floor({CONFERENCE_POOL} * random() ^ 2)::int AS k,
                            random() AS r_fmt, random() AS r_dur, random() AS r_jit,
                            random() AS r_status, random() AS r_hold, random() AS r_started
                        FROM generate_series(1, %(n)s) AS i
                    ) AS draws
                ) AS rows
                ORDER BY i
                """,  # noqa: S608 - only numbers and constants of this module are formatted in
                {"n": recordings},
            )
            timings["recordings_s"] = time.perf_counter() - started
            conn.execute(
                f"""
                INSERT INTO participants (
                    recording_pk, member_id, "from", "to", from_key, to_key, caller_name,
                    direction, call_uuid, join_time, member_pk, joined_at, left_at, source)
                SELECT
                    id, m::text,
                    CASE WHEN inbound THEN customer ELSE bridge END,
                    CASE WHEN inbound THEN bridge ELSE customer END,
                    CASE WHEN inbound THEN customer_key ELSE bridge_key END,
                    CASE WHEN inbound THEN bridge_key ELSE customer_key END,
                    'Caller ' || c, CASE WHEN inbound THEN 'inbound' ELSE 'outbound' END,
                    md5(id::text || '-' || m), (m * 10)::text,
                    (id - 1) * %(per)s + m,
                    to_timestamp((start_ms - m * 10000) / 1000.0),
                    to_timestamp((end_ms + m * 1000) / 1000.0), 'event'
                FROM (
                    SELECT r.id, r.start_ms, r.end_ms, m, c, random() < 0.8 AS inbound,
                        CASE WHEN sip THEN 'sip:user' || c || '@example.com'
                             ELSE '+1' || (4155550000 + c)::text END AS customer,
                        CASE WHEN sip THEN 'user' || c || '@example.com'
                             ELSE '1' || (4155550000 + c)::text END AS customer_key,
                        '+1800555' || lpad(mod(r.id, {BRIDGE_NUMBERS})::text, 4, '0') AS bridge,
                        '1800555' || lpad(mod(r.id, {BRIDGE_NUMBERS})::text, 4, '0') AS bridge_key
                    FROM recordings r
                    CROSS JOIN generate_series(1, %(per)s) AS m
                    CROSS JOIN LATERAL (
                        SELECT floor({CUSTOMER_POOL} * random() ^ 2)::int + 0 * (r.id + m) AS c,
                            random() < 0.05 + 0 * (r.id + m) AS sip
                    ) AS draws
                    ORDER BY r.id, m
                ) AS rows
                """,  # noqa: S608 - only numbers and constants of this module are formatted in
                {"per": participants_per},
            )
            timings["participants_s"] = time.perf_counter() - started - timings["recordings_s"]
            # The members the participants were copied from, under the same ids.
            conn.execute(
                """
                INSERT INTO conference_members (
                    id, conference_name, conference_uuid, identity, member_id, call_uuid, "from",
                    "to", caller_name, direction, join_time, joined_at, left_at, last_seen_at,
                    source, details_at, details_attempts, created_at)
                SELECT p.member_pk, r.conference_name, r.conference_uuid, p.call_uuid,
                    p.member_id, p.call_uuid, p."from", p."to", p.caller_name, p.direction,
                    p.join_time, p.joined_at, p.left_at, p.left_at, 'event', p.left_at, 1,
                    p.joined_at
                FROM participants p JOIN recordings r ON r.id = p.recording_pk
                ORDER BY p.member_pk
                """
            )
            conn.execute(
                "SELECT setval(pg_get_serial_sequence('conference_members', 'id'), "
                "(SELECT coalesce(max(id), 1) FROM conference_members))"
            )
            timings["members_s"] = (
                time.perf_counter() - started - timings["recordings_s"] - timings["participants_s"]
            )
        index_started = time.perf_counter()
        conn.execute("SET maintenance_work_mem = '256MB'")
        for _, definition in indexes:
            conn.execute(definition)
        timings["indexes_s"] = time.perf_counter() - index_started
        vacuum_started = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) recordings")
        conn.execute("VACUUM (ANALYZE) participants")
        conn.execute("VACUUM (ANALYZE) conference_members")
        timings["vacuum_analyze_s"] = time.perf_counter() - vacuum_started
    timings["total_s"] = time.perf_counter() - started
    return {
        **counts(url),
        "indexes_rebuilt": [name for name, _ in indexes],
        **{k: round(v, 2) for k, v in timings.items()},
    }


def counts(url: str) -> dict[str, int]:
    """How many recordings and participants the database holds."""
    import psycopg

    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM recordings), (SELECT count(*) FROM participants)"
        ).fetchone()
    assert row is not None
    return {"recordings": row[0], "participants": row[1]}


# Words of a transcript, most frequent first: a word's rank is drawn as random()^3, so "the" is
# in nearly every transcript and the last ones in few.
VOCABULARY = (
    "the", "to", "and", "you", "a", "i", "that", "is", "of", "we", "it", "on", "for", "this",
    "in", "have", "be", "so", "can", "okay", "yes", "price", "market", "trade", "order",
    "client", "rate", "bond", "equity", "position", "risk", "call", "today", "tomorrow",
    "million", "buy", "sell", "desk", "account", "confirm", "limit", "spread", "volume",
    "fund", "yield", "hedge", "settlement", "compliance", "portfolio", "exposure", "currency",
    "london", "tokyo", "swap", "option", "futures", "basis", "points", "allocation",
    "counterparty", "margin", "collateral", "liquidity", "mandate", "benchmark", "treasury",
)  # fmt: skip
RARE_PHRASE = "guaranteed return"  # in 0.1% of transcripts
RARE_WORD = "zyxwidget"  # in 0.01% of transcripts


def load_transcripts(url: str, words: int, seed: float = 0.24) -> dict:
    """A transcript of `words` words for every finished recording, generated inside PostgreSQL
    ("Speaker N:" turns of words from VOCABULARY, skewed), with RARE_PHRASE in 0.1% of them and
    RARE_WORD in 0.01%; the full-text index dropped during the load and re-created after."""
    import psycopg

    vocabulary = "ARRAY[" + ",".join(f"'{w}'" for w in VOCABULARY) + "]"
    started = time.perf_counter()
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        indexes = conn.execute(
            """
            SELECT i.indexname, i.indexdef FROM pg_indexes i
            WHERE i.tablename = 'transcripts'
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)
            """
        ).fetchall()
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute("SELECT setseed(%s)", (seed,))
            conn.execute(
                f"""
                INSERT INTO transcripts (
                    recording_id, status, text, chars, error, details, sha256, received_at,
                    archive_key, archive_size, archived_at, archive_attempts, created_at)
                SELECT recording_id, 'received', body, length(body), NULL,
                    '{{"source": "callback"}}'::json, md5(body) || md5(recording_id), now(),
                    regexp_replace(archive_key, '\\.[a-z0-9]+$', '.transcript.json'),
                    length(body), now(), 1, now()
                FROM (
                    SELECT r.recording_id, r.archive_key,
                        'Speaker 0: ' || t.spoken
                        || CASE WHEN random() < 0.001 + 0 * r.id
                                THEN ' {RARE_PHRASE} on this' ELSE '' END
                        || CASE WHEN random() < 0.0001 + 0 * r.id
                                THEN ' {RARE_WORD}' ELSE '' END AS body
                    FROM recordings r
                    CROSS JOIN LATERAL (
                        SELECT string_agg(
                            CASE WHEN mod(n, 40) = 0 THEN E'\\nSpeaker ' || mod(n / 40, 2)
                                 || ': ' ELSE '' END
                            || ({vocabulary})[1 + floor({len(VOCABULARY)} * random() ^ 3)::int],
                            ' ') AS spoken
                        FROM generate_series(1, %(words)s + 0 * r.id) AS n
                    ) AS t
                    WHERE r.status <> 'recording'
                    ORDER BY r.id
                ) AS rows
                """,  # noqa: S608 - only constants of this module are formatted in
                {"words": words},
            )
        load_s = time.perf_counter() - started
        conn.execute("SET maintenance_work_mem = '256MB'")
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("VACUUM (ANALYZE) transcripts")
        counts = conn.execute(
            "SELECT count(*), coalesce(avg(chars), 0)::int, "
            "count(*) FILTER (WHERE text LIKE %s), count(*) FILTER (WHERE text LIKE %s) "
            "FROM transcripts",
            (f"%{RARE_PHRASE}%", f"%{RARE_WORD}%"),
        ).fetchone()
        assert counts is not None
    return {
        "transcripts": counts[0],
        "average_chars": counts[1],
        "with_rare_phrase": counts[2],
        "with_rare_word": counts[3],
        "indexes_rebuilt": [name for name, _ in indexes],
        "load_s": round(load_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
    }
