"""Engine and sessions: one session per request, one transaction per job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flask import current_app, g
from sqlalchemy import CursorResult, Engine, Result, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# How long any wait for PostgreSQL may last (DATABASE_TIMEOUT_SECONDS): connecting, a statement,
# a free connection of the pool; an answer gets a second more before the network is given up on.
DATABASE_TIMEOUT_SECONDS = 5
# The most connections one process opens (DATABASE_POOL_SIZE). Concurrent callbacks commit
# together (PostgreSQL flushes their commits in one write): a pool smaller than the requests in
# flight makes them queue for a connection instead (bench/ingest.py: 5 + 5 overflow gave 0.35 of
# the reference's throughput, 20 + 5 gave 0.73).
DATABASE_POOL_SIZE = 20
# A pooled connection unused for this long is pinged before a request may use it.
PING_AFTER_IDLE_SECONDS = 2.0


def make_engine(
    url: str,
    timeout: float = DATABASE_TIMEOUT_SECONDS,
    pool_size: int = DATABASE_POOL_SIZE,
    **kwargs: Any,
) -> Engine:
    """An engine that survives a database restart and lets two processes share SQLite; on
    PostgreSQL no wait for the database lasts much longer than `timeout` seconds, and a process
    holds at most `pool_size` connections (opened as they are needed)."""
    # Statement parameters hold callback bodies and signature headers: never in an error's text.
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the web process read while the worker writes; busy_timeout waits for locks
            # instead of failing at once.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    kwargs.setdefault("pool_size", pool_size)
    kwargs.setdefault("max_overflow", 0)
    kwargs.setdefault("pool_timeout", timeout)  # waiting for a free connection of the pool
    kwargs.setdefault(
        "connect_args",
        {
            # The whole connection setup, authentication included.
            "connect_timeout": max(2, round(timeout)),
            # A partition drops packets without a reset: the kernel gives up on data the server
            # does not acknowledge after tcp_user_timeout, and probes idle connections.
            "tcp_user_timeout": round((timeout + 1) * 1000),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        },
    )
    engine = create_engine(url, **kwargs)
    connection_class = _bounded_connection_class()

    # A connection that has waited in the pool is pinged before use (a restarted server or a
    # dropped idle connection is found there, and replaced, instead of failing a request); one
    # given back moments ago is not, which saves a round trip on every busy request.
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            # The pool drops this connection and checks out another (or connects anew).
            raise DisconnectionError(str(error)) from error

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        connection = connection_class.connect(*cargs, **cparams)
        # The server cancels a statement after `timeout`; with no answer a second after that,
        # the network is gone (or the server hangs), whatever the kernel still acknowledges.
        connection.answer_within = timeout + 1
        return connection

    @event.listens_for(engine, "connect")
    def _statement_timeout(dbapi_connection: Any, _record: Any) -> None:
        # A SET rather than the `options` startup parameter, which PgBouncer refuses; outside a
        # transaction, so one round trip (not BEGIN, SET, COMMIT): connections are opened when
        # the load grows, when every round trip waits behind the other requests.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        dbapi_connection.execute(f"SET statement_timeout = {round(timeout * 1000)}")
        dbapi_connection.autocommit = autocommit

    return engine


@cache
def _bounded_connection_class() -> Any:
    """psycopg's connection, closed and failing when the server does not answer in time."""
    # Imported here: SQLite deployments need no psycopg, and gevent must patch before it loads.
    import psycopg
    from psycopg.errors import _WaitTimeout

    class BoundedConnection(psycopg.Connection[Any]):
        answer_within: float | None = None

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            if timeout is None:
                timeout = self.answer_within
            try:
                return super().wait(gen, interval, timeout)
            except _WaitTimeout:
                # Mid-protocol: the connection cannot be used again. Closed, SQLAlchemy sees a
                # disconnect and drops it (and the rest of its pool) instead of reusing it.
                self.close()
                raise psycopg.OperationalError(
                    f"the database did not answer within {timeout:g} seconds"
                ) from None

    return BoundedConnection


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (views serialise after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


def request_session() -> Session:
    """The session of the current request, opened on first use and closed at teardown."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["webhook"].sessions()
    session: Session = g.db_session
    return session


def close_request_session(_exc: BaseException | None = None) -> None:
    """Roll back whatever the request did not commit, and give the connection back."""
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session


def execute_autocommitted(engine: Engine, statement: str, params: dict[str, Any]) -> Any:
    """Run one statement in a transaction of its own and return its first row: PostgreSQL,
    on a pooled connection, through psycopg itself (the statement in psycopg's parameter style).

    For the busiest statements of the service: SQLAlchemy's Connection around one cost a fifth
    of a callback's CPU. Errors still come out as SQLAlchemy's (IntegrityError,
    OperationalError…), and a connection the database dropped is invalidated, as SQLAlchemy
    would.
    """
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        pooled = engine.raw_connection()
    except dbapi_error as error:
        raise _wrapped(engine, statement, error, None) from error
    raw: Any = pooled.driver_connection
    try:
        try:
            raw.autocommit = True
            return raw.execute(statement, params).fetchone()
        except dbapi_error as error:
            wrapped = _wrapped(engine, statement, error, raw)
            if wrapped.connection_invalidated:
                pooled.invalidate(error)
            raise wrapped from error
        finally:
            if not raw.closed:
                try:
                    raw.autocommit = False
                except dbapi_error as error:
                    # Left mid-statement (the statement was interrupted): not fit for the pool,
                    # and whatever interrupted it is what the caller hears of.
                    pooled.invalidate(error)
    finally:
        pooled.close()


def _wrapped(engine: Engine, statement: str, error: Any, raw: Any) -> DBAPIError:
    invalidated = raw is None or bool(engine.dialect.is_disconnect(error, raw, None))
    wrapped = DBAPIError.instance(
        statement,
        None,
        error,
        engine.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=invalidated,
        dialect=engine.dialect,
    )
    assert isinstance(wrapped, DBAPIError)
    return wrapped


NOT_MIGRATED = "the database is not migrated to this version of the service"
UPGRADE_HINT = "run `webhook db upgrade` (the Procfile's release phase does it on each deploy)"
# PostgreSQL's undefined_table and undefined_column; SQLite says so in words.
_SCHEMA_SQLSTATES = ("42P01", "42703")
_SCHEMA_MESSAGES = ("no such table", "no such column", "has no column named")


def is_schema_missing(exc: BaseException) -> bool:
    """Whether a database error means a table or column is missing: migrations not applied."""
    if not isinstance(exc, ProgrammingError | OperationalError):
        return False
    if getattr(exc.orig, "sqlstate", None) in _SCHEMA_SQLSTATES:
        return True
    return str(exc.orig).lower().startswith(_SCHEMA_MESSAGES)


def is_disconnect(exc: BaseException) -> bool:
    """Whether a database error means the database could not be reached (retry later)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError) and not is_schema_missing(exc)


def describe_error(exc: DBAPIError) -> str:
    """A database error for the logs without the data it may quote: PostgreSQL's DETAIL and
    CONTEXT lines repeat key values and the input that failed (callback bodies, signatures)."""
    orig = exc.orig
    kind = type(orig).__name__
    sqlstate = getattr(orig, "sqlstate", None)
    diag = getattr(orig, "diag", None)
    if sqlstate is None:
        # SQLite's messages name constraints and tables, never values.
        return f"{kind}: {str(orig).splitlines()[0][:200]}" if str(orig) else kind
    parts = [f"{kind} (SQLSTATE {sqlstate})"]
    constraint = getattr(diag, "constraint_name", None)
    table = getattr(diag, "table_name", None)
    if table:
        parts.append(f"table {table}")
    if constraint:
        parts.append(f"constraint {constraint}")
    if isinstance(exc, OperationalError) or sqlstate.startswith(("08", "57", "53", "P0")):
        # Connection, shutdown and resource failures, and the triggers' own messages, carry no
        # request data in their first line.
        primary = getattr(diag, "message_primary", None)
        if primary:
            parts.append(str(primary)[:200])
    return ", ".join(parts)


def migrations_folder() -> Path:
    """`migrations/` beside the package (a checkout or editable install), else in the cwd."""
    for candidate in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (candidate / "migrations" / "env.py").is_file():
            return candidate / "migrations"
    raise FileNotFoundError("no migrations/ folder beside the package or in the current directory")


def alembic_config(database_url: str) -> AlembicConfig:
    """Alembic's configuration for the migrations in `migrations/`, aimed at `database_url`."""
    # Imported here: Alembic is only needed by `webhook db upgrade`, not to serve requests.
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_folder()))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


# The newest migration in `migrations/versions`. Every process checks the database against it
# when it starts; reading it from the folder would mean loading Alembic, a tenth of a second of
# every start. tests/test_migrations.py checks it against Alembic's own reading of the folder.
HEAD_REVISION = "0013"


def head_revision() -> str:
    """The newest migration in `migrations/`."""
    return HEAD_REVISION


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: never migrated); raises DBAPIError if down."""
    with engine.connect() as connection:
        try:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        except DBAPIError as exc:
            if is_schema_missing(exc):
                return None
            raise
    # Alembic keeps one row per head; the migrations here form one line.
    return ", ".join(sorted(row[0] for row in versions)) or None


def migrations_pending(engine: Engine) -> str | None:
    """None when the database is at the newest migration, else a sentence saying where it is."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return None
    found = "has no migrations applied" if current is None else f"is at revision {current}"
    return f"the database {found}, the service needs {head}; {UPGRADE_HINT}"


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply the migrations up to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE, DELETE or INSERT … ON CONFLICT statement changed."""
    return cast("CursorResult[Any]", result).rowcount
