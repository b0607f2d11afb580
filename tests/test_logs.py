"""The request line written straight to the JSON handler's stream, and request ids."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from webhook.logs import JSONFormatter, info_line_writer, new_request_id

FIELDS = {
    "method": "POST",
    "path": "/plivo/recording",
    "status": 200,
    "ms": 12.5,
    "request_id": "ab" * 16,
    "recording_id": "rec-1",
    "staff": None,
    "remote_addr": "127.0.0.1",
    "callback": "recording",
    "duplicate": False,
}


Tree = tuple[logging.Logger, logging.StreamHandler[io.StringIO], io.StringIO]


@contextmanager
def logger_tree() -> Iterator[Tree]:
    """A logger tree as `logs.configure` sets one up: the JSON handler on its root, which does
    not propagate, and a child that has no handler of its own. Made inside the test: pytest adds
    its capturing handler to every logger that does not propagate when a test's phase begins."""
    name = f"lines{time.monotonic_ns()}"
    root = logging.getLogger(name)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    child = logging.getLogger(f"{name}.request")
    try:
        yield child, handler, stream
    finally:
        root.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_written_line_is_the_line_logging_writes() -> None:
    with logger_tree() as (logger, _handler, stream):
        write = info_line_writer(logger)
        assert write is not None
        before = time.time()
        write("request", dict(FIELDS))
        logger.info("request", extra=dict(FIELDS))
        written, logged = lines(stream)
        assert list(written) == list(logged)  # the same keys, in the same order
        assert {**written, "ts": None} == {**logged, "ts": None}
        assert written["logger"] == logger.name and written["level"] == "info"
        stamp = str(written["ts"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
        seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
        assert before - 1 <= seconds + int(stamp[20:23]) / 1000 <= time.time()


def test_nothing_is_written_below_the_loggers_level() -> None:
    with logger_tree() as (logger, handler, stream):
        write = info_line_writer(logger)
        assert write is not None
        logger.parent.setLevel(logging.WARNING)  # type: ignore[union-attr]
        write("request", dict(FIELDS))
        logger.parent.setLevel(logging.INFO)  # type: ignore[union-attr]
        handler.setLevel(logging.ERROR)
        write("request", dict(FIELDS))
        handler.setLevel(logging.NOTSET)
        write("request", {"path": "/written"})
        assert [line["path"] for line in lines(stream)] == ["/written"]


def test_records_that_may_go_elsewhere_keep_going_through_logging() -> None:
    with logger_tree() as (logger, handler, _stream):
        root = logger.parent
        assert root is not None
        other = logging.StreamHandler(io.StringIO())
        other.setFormatter(JSONFormatter())
        for add, remove in (
            (lambda: logger.addHandler(other), lambda: logger.removeHandler(other)),
            (lambda: root.addHandler(other), lambda: root.removeHandler(other)),
            (lambda: logger.addFilter(len), lambda: logger.removeFilter(len)),
            (lambda: handler.addFilter(len), lambda: handler.removeFilter(len)),
        ):
            add()
            try:
                assert info_line_writer(logger) is None
            finally:
                remove()
        # A formatter of another kind, or of JSONFormatter's kind that formats its own way.
        for formatter in (logging.Formatter(), type("Own", (JSONFormatter,), {})()):
            handler.setFormatter(formatter)
            assert info_line_writer(logger) is None


def test_a_line_that_cannot_be_written_is_lost_not_the_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with logger_tree() as (logger, _handler, stream):
        write = info_line_writer(logger)
        assert write is not None
        stream.close()
        write("request", dict(FIELDS))  # raises nothing
    assert "Logging error" in capsys.readouterr().err


def test_request_ids_differ_and_a_forked_child_draws_its_own() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns of a fork while other threads run; the child only writes and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent, and nothing else
        try:
            os.write(write, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child_id = pipe.read()
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id != new_request_id()
