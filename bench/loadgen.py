"""The load generator: every pre-built request sent exactly once over N concurrent connections,
by wrk (when installed; a Lua script hands each request out once) or by a Python asyncio client,
and the same generator run alone against a raw socket server to show it is not the bottleneck."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    CALLBACK_PATH,
    Service,
    die_with_parent,
    free_port,
    percentile,
    service_env,
)


@dataclass
class LoadResult:
    """What a load run did. `rps` is completions per second over the window from the first
    request sent to the last one sent, so both generators measure the same thing."""

    generator: str
    connections: int
    requests: int
    completed: int
    lost: int  # no answer seen: socket errors, or (wrk) still in flight when it stopped
    statuses: dict[str, int]
    markers: dict[str, int]
    window_s: float
    rps: float
    latency_ms: dict[str, float]
    generator_cpu_s: float
    socket_errors: int
    server_closes: bool  # the server closed the connection after each answer (no keep-alive)
    notes: list[str] = field(default_factory=list)

    @property
    def non_200(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    def brief(self) -> dict[str, Any]:
        return asdict(self)


def choose_generator(requested: str) -> str:
    """`auto` is wrk when it is installed, else the Python generator."""
    if requested == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if requested == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--generator wrk, but wrk is not installed (apt-get install wrk)")
    return requested


def send_load(
    port: int,
    requests: Sequence[bytes],
    connections: int,
    generator: str,
    workdir: Path,
    markers: Sequence[str] = (),
    timeout: float = 600.0,
) -> LoadResult:
    """Send every request exactly once over `connections` concurrent connections."""
    if not requests:
        raise ValueError("no requests to send")
    connections = max(1, min(connections, len(requests)))
    if generator == "wrk":
        return _wrk_load(port, requests, connections, workdir, markers, timeout)
    return _python_load(port, requests, connections, markers, timeout)


def _latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    return {
        "p50": round(percentile(ms, 50), 2),
        "p90": round(percentile(ms, 90), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2) if ms else math.nan,
        "mean": round(sum(ms) / len(ms), 2) if ms else math.nan,
    }


HEADER_END = b"\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


def _python_load(
    port: int,
    requests: Sequence[bytes],
    connections: int,
    markers: Sequence[str],
    timeout: float,
) -> LoadResult:
    """An asyncio (Protocol-level, no streams) HTTP/1.1 client: `connections` connections, each
    taking the next request as soon as its previous answer is in; reconnects when the server
    closes (gunicorn's sync workers close after every answer)."""
    import asyncio

    marker_bytes = [m.encode() for m in markers]
    total = len(requests)
    state: dict[str, Any] = {
        "next": 0,
        "done": 0,
        "t_first": None,
        "t_exhausted": None,
        "done_by_exhaustion": 0,
        "closes": 0,
    }
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    found: Counter[str] = Counter()
    socket_errors = 0

    async def run() -> None:
        nonlocal socket_errors
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def complete() -> None:
            state["done"] += 1
            if state["done"] == total and not finished.done():
                finished.set_result(None)

        def take() -> int | None:
            if state["next"] >= total:
                return None
            index = state["next"]
            state["next"] += 1
            now = time.perf_counter()
            if index == 0:
                state["t_first"] = now
            if state["next"] == total:
                state["t_exhausted"] = now
                state["done_by_exhaustion"] = state["done"]
            return index

        class Connection(asyncio.Protocol):
            def __init__(self) -> None:
                self.buffer = bytearray()
                self.pending: int | None = None
                self.sent_at = 0.0
                self.transport: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                self.send_next()

            def send_next(self) -> None:
                assert self.transport is not None
                index = take()
                if index is None:
                    self.transport.close()
                    return
                self.pending = index
                self.buffer.clear()
                self.sent_at = time.perf_counter()
                self.transport.write(requests[index])

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                end = self.buffer.find(HEADER_END)
                if end < 0:
                    return
                match = CONTENT_LENGTH.search(self.buffer, 0, end + 2)
                length = int(match[1]) if match else 0
                if len(self.buffer) < end + 4 + length:
                    return
                latencies.append(time.perf_counter() - self.sent_at)
                statuses[self.buffer[9:12].decode()] += 1
                body = bytes(self.buffer[end + 4 : end + 4 + length])
                for marker in marker_bytes:
                    if marker in body:
                        found[marker.decode()] += 1
                closing = CONNECTION_CLOSE.search(self.buffer, 0, end + 2) is not None
                self.pending = None
                complete()
                if closing:
                    state["closes"] += 1
                    assert self.transport is not None
                    self.transport.close()
                    if state["next"] < total:
                        open_connection()
                else:
                    self.send_next()

            def connection_lost(self, exc: Exception | None) -> None:
                nonlocal socket_errors
                if self.pending is not None:
                    socket_errors += 1
                    self.pending = None
                    complete()
                    if state["next"] < total:
                        open_connection()

        async def connect() -> None:
            nonlocal socket_errors
            try:
                await loop.create_connection(Connection, "127.0.0.1", port)
            except OSError:
                socket_errors += 1
                if take() is not None:
                    complete()
                if state["next"] < total:
                    await asyncio.sleep(0.01)
                    open_connection()

        tasks: set[asyncio.Task[None]] = set()

        def open_connection() -> None:
            task = loop.create_task(connect())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        for _ in range(connections):
            open_connection()
        await asyncio.wait_for(finished, timeout)

    cpu_before = time.process_time()
    asyncio.run(run())
    cpu = time.process_time() - cpu_before
    window = (state["t_exhausted"] or 0) - (state["t_first"] or 0)
    return LoadResult(
        generator="python",
        connections=connections,
        requests=total,
        completed=len(latencies),
        lost=total - len(latencies),
        statuses=dict(statuses),
        markers={m: found[m] for m in markers},
        window_s=round(window, 4),
        rps=round(state["done_by_exhaustion"] / window, 1) if window > 0 else math.nan,
        latency_ms=_latency_summary(latencies),
        generator_cpu_s=round(cpu, 3),
        socket_errors=socket_errors,
        server_closes=state["closes"] > 0,
    )


# wrk sends each pre-built request exactly once: thread t of T takes requests t, t+T, ...; when a
# thread has sent its last one it stops at once (no filler requests: a gunicorn sync worker would
# block on an idle connection). The answers still in flight then are not seen (`lost`), but the
# server handles them all. Times come from clock_gettime through LuaJIT's FFI.
WRK_SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clock_id, bench_timespec_t *tp);
unsigned long pthread_self(void);
]]
local ts = ffi.new("bench_timespec_t")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

local reqs = {}
local pos = 0
local markers = {}
local done_path = nil
local init_thread = nil
function init(args)
  local nthreads = tonumber(args[2])
  done_path = args[3] .. "/done." .. tid
  n_markers = #args - 3
  for i = 4, #args do
    markers[#markers + 1] = args[i]
    _G["mk_" .. (i - 3)] = 0
  end
  local f = assert(io.open(args[1], "rb"))
  local index = 0
  while true do
    local line = f:read("*l")
    if not line then break end
    local req = f:read(tonumber(line))
    if index % nthreads == tid then reqs[#reqs + 1] = req end
    index = index + 1
  end
  f:close()
  n_expected = #reqs
  n_resp = 0
  n_sent = 0
  t_first = 0
  t_exhausted = 0
  resp_at_exhaustion = 0
  -- wrk calls request() once on the main thread to inspect it: that call must not use one up.
  init_thread = ffi.C.pthread_self()
end

function request()
  if ffi.C.pthread_self() == init_thread then
    return reqs[1]
  end
  if pos >= #reqs then
    return ""
  end
  pos = pos + 1
  n_sent = pos
  if pos == 1 then t_first = now() end
  if pos == #reqs then
    t_exhausted = now()
    resp_at_exhaustion = n_resp
    local f = io.open(done_path, "w")
    if f then f:close() end
    wrk.thread:stop()
  end
  return reqs[pos]
end

function response(status, headers, body)
  n_resp = n_resp + 1
  local key = "st_" .. status
  _G[key] = (_G[key] or 0) + 1
  if headers["Connection"] == "close" or headers["connection"] == "close" then
    server_closes = true
  end
  if body then
    for i, m in ipairs(markers) do
      if string.find(body, m, 1, true) then
        _G["mk_" .. i] = _G["mk_" .. i] + 1
      end
    end
  end
end

function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    local st = {}
    for code = 100, 599 do
      local v = t:get("st_" .. code)
      if v then st[#st + 1] = string.format('"%d":%d', code, v) end
    end
    local mk = {}
    for i = 1, (t:get("n_markers") or 0) do
      mk[#mk + 1] = string.format("%d", t:get("mk_" .. i) or 0)
    end
    parts[#parts + 1] = string.format(
      '{"expected":%d,"sent":%d,"resp":%d,"resp_at_exhaustion":%d,"t_first":%.6f,' ..
      '"t_exhausted":%.6f,"closes":%s,"statuses":{%s},"markers":[%s]}',
      t:get("n_expected") or 0, t:get("n_sent") or 0, t:get("n_resp") or 0,
      t:get("resp_at_exhaustion") or 0, t:get("t_first") or 0, t:get("t_exhausted") or 0,
      tostring(t:get("server_closes") == true), table.concat(st, ","), table.concat(mk, ","))
  end
  local lat = {}
  for _, p in ipairs({50, 90, 99}) do
    lat[#lat + 1] = string.format('"p%d":%d', p, latency:percentile(p))
  end
  io.write(string.format(
    'BENCHJSON {"threads":[%s],"latency_us":{%s,"max":%d,"mean":%.1f},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d}}\n',
    table.concat(parts, ","), table.concat(lat, ","), latency.max, latency.mean,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"""


def _wrk_load(
    port: int,
    requests: Sequence[bytes],
    connections: int,
    workdir: Path,
    markers: Sequence[str],
    timeout: float,
) -> LoadResult:
    threads = 1  # one event loop is far faster than any server here; see the calibration
    run_dir = Path(tempfile.mkdtemp(prefix="wrk-", dir=workdir))
    script = run_dir / "send_once.lua"
    script.write_text(WRK_SCRIPT)
    request_file = run_dir / "requests.bin"
    with request_file.open("wb") as out:
        for raw in requests:
            out.write(b"%d\n" % len(raw))
            out.write(raw)
    done_dir = run_dir / "done"
    done_dir.mkdir()
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{int(timeout)}s",
        "-T",
        "60s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{CALLBACK_PATH}",
        "--",
        str(request_file),
        str(threads),
        str(done_dir),
        *markers,
    ]
    with tempfile.TemporaryFile() as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while popen.poll() is None:
            if len(list(done_dir.iterdir())) >= threads or time.monotonic() > deadline:
                # Every thread has sent its share: wake wrk's main thread to report.
                popen.send_signal(signal.SIGINT)
                break
            time.sleep(0.01)
        _, status, usage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode(errors="replace")
    line = next((x for x in output.splitlines() if x.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {popen.returncode}):\n{output}")
    report = json.loads(line.removeprefix("BENCHJSON "))
    per_thread = report["threads"]
    statuses: Counter[str] = Counter()
    found: Counter[str] = Counter()
    for thread in per_thread:
        statuses.update(thread["statuses"])
        for marker, count in zip(markers, thread["markers"], strict=True):
            found[marker] += count
    completed = sum(t["resp"] for t in per_thread)
    sent = sum(t["sent"] for t in per_thread)
    rate = sum(
        t["resp_at_exhaustion"] / (t["t_exhausted"] - t["t_first"])
        for t in per_thread
        if t["t_exhausted"] > t["t_first"]
    )
    window = max(t["t_exhausted"] for t in per_thread) - min(t["t_first"] for t in per_thread)
    errors = report["errors"]
    notes = []
    if sent != len(requests):
        notes.append(f"wrk sent {sent} of {len(requests)} requests")
    return LoadResult(
        generator="wrk",
        connections=connections,
        requests=len(requests),
        completed=completed,
        lost=len(requests) - completed,
        statuses=dict(statuses),
        markers={m: found[m] for m in markers},
        window_s=round(window, 4),
        rps=round(rate, 1),
        latency_ms={
            key: round(value / 1000, 2)
            for key, value in report["latency_us"].items()
            if key in ("p50", "p90", "p99", "max", "mean")
        },
        generator_cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
        socket_errors=sum(errors.values()),
        server_closes=any(t["closes"] for t in per_thread),
        notes=notes,
    )


def calibrate_generator(
    requests: Sequence[bytes],
    connections: int,
    generator: str,
    close: bool,
    workdir: Path,
    logdir: Path,
) -> LoadResult:
    """The generator alone: the same requests against a raw socket server (one process per CPU,
    sharing the port) that answers each with a fixed 200, closing after each answer when the
    real server does. Its rate is a floor for what the generator can do on this machine."""
    port = free_port()
    procs = str(os.cpu_count() or 1)
    argv = [sys.executable, str(BENCH / "servers.py"), "raw", "--port", str(port), "--procs", procs]
    server = Service(
        "raw-server",
        [*argv, "--close"] if close else argv,
        service_env(logdir / "home-raw"),
        logdir,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or not server.running:
                raise RuntimeError(f"raw server did not start:\n{server.tail()}")
            time.sleep(0.05)
        return send_load(port, requests, connections, generator, workdir)
    finally:
        server.stop()
