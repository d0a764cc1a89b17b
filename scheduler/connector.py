"""The queue's connections to its database, and the one place where driver errors become
typed ``scheduler.errors`` (Retryable, ConnectionLost, Unavailable, DuplicateKey): callers
decide by type, never by a driver's message or by attributes added to its exceptions."""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from lorry.scheduler import errors, queries
from lorry.scheduler.claim_cache import bump_generation
from lorry.scheduler.db import WROTE_GROUPS

try:  # PostgreSQL's driver; the SQLite path runs without it
    import psycopg
    from psycopg import errors as pg_errors
    _PG_ERROR: tuple = (psycopg.Error,)
    _PG_OUTAGES: tuple = (psycopg.OperationalError, psycopg.InterfaceError)
    _PG_RETRYABLE: tuple = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
    _PG_DUPLICATE: tuple = (pg_errors.UniqueViolation,)
    _PG_CANCELED: tuple = (pg_errors.QueryCanceled,)
except ImportError:  # pragma: no cover
    _PG_ERROR = _PG_OUTAGES = _PG_RETRYABLE = _PG_DUPLICATE = _PG_CANCELED = ()

log = logging.getLogger(__name__)

# Seconds a statement may run on PostgreSQL by default (JobQueue's statement_timeout_seconds)
STATEMENT_TIMEOUT_S = 60.0

# What convert() looks at: errors of the drivers and of SQLAlchemy's connection layer.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError) + _PG_ERROR
# Connection refused or dropped, server shutting down, pool exhausted, SQLite locked: the
# statement did not run (or its outcome is unknown) and the same call can succeed later.
OUTAGES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
    sa_exc.TimeoutError) + _PG_OUTAGES
# SQLite's extended result codes of a unique / primary-key violation (named in sqlite3 and
# carried by its errors from Python 3.11; the numbers are SQLite's own)
_SQLITE_DUPLICATE = frozenset({getattr(sqlite3, "SQLITE_CONSTRAINT_UNIQUE", 2067),
                               getattr(sqlite3, "SQLITE_CONSTRAINT_PRIMARYKEY", 1555)})


def _sqlite_duplicate(driver: BaseException) -> bool:
    if not isinstance(driver, sqlite3.IntegrityError):
        return False
    code = getattr(driver, "sqlite_errorcode", None)
    if code is None:  # Python 3.10: no result code, only SQLite's fixed message
        return str(driver).startswith(("UNIQUE constraint failed", "PRIMARY KEY must be"))
    return code in _SQLITE_DUPLICATE


def convert(exc: BaseException) -> errors.QueueError | None:
    """The typed error of a driver error, by the driver's exception type (and SQLite's
    extended result code); None for one that is not converted (a bug or data the database
    refuses: it propagates as it is)."""
    driver = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(driver, _PG_RETRYABLE):
        return errors.Retryable()
    if isinstance(driver, _PG_DUPLICATE) or _sqlite_duplicate(driver):
        return errors.DuplicateKey()
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return _logged(exc, errors.ConnectionLost())
    if isinstance(exc, OUTAGES) or type(driver) is sqlite3.DatabaseError:
        # (the latter: SQLite's "file is not a database" / "database disk image is
        # malformed": the file cannot be read, as an outage; its subclasses, integrity and
        # programming errors, stay bugs or refusals)
        return _logged(exc, errors.Unavailable())
    return None


def _logged(exc: BaseException, typed: errors.Unavailable) -> errors.Unavailable:
    # The cause is logged, not shown: it names hosts and ports.
    driver = getattr(exc, "orig", None) or exc
    cause = str(driver).strip().splitlines()
    if _PG_CANCELED and isinstance(driver, _PG_CANCELED):
        log.warning("a statement ran past the database's statement_timeout "
                    "(LORRY_DATABASE_STATEMENT_TIMEOUT_SECONDS) and was cancelled: %s",
                    cause[0] if cause else "")
    else:
        log.warning("database unavailable: %s: %s", type(exc).__name__,
                    cause[0] if cause else "")
    return typed


def raise_typed(exc: BaseException) -> NoReturn:
    """Raise the typed error of exc (from exc), or exc itself when convert() leaves it."""
    typed = convert(exc)
    if typed is None:
        raise exc
    raise typed from exc


class Connector:
    """The queue's engine and, on PostgreSQL, the claims' own pool. Every driver error that
    leaves ``begin``, ``connect`` or ``claim_session`` is converted (see ``convert``).
    ``statement_timeout_s`` bounds each statement's wait on PostgreSQL (see ``make_engine``)."""

    def __init__(self, url: str, statement_timeout_s: float = STATEMENT_TIMEOUT_S,
                 **engine_kwargs):
        self.url, self._engine_kwargs = url, engine_kwargs
        self._statement_timeout_s = statement_timeout_s
        self.engine = make_engine(url, statement_timeout_s, **engine_kwargs)
        self._claim_pool: Engine | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction: committed at the end, rolled back on error."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise_typed(exc)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads (its transaction is rolled back at the end)."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise_typed(exc)

    @contextmanager
    def claim_session(self) -> Iterator[tuple[Connection, Any]]:
        """PostgreSQL: (connection, bare psycopg cursor) from the claims' pool: autocommit,
        no ping per checkout (a round trip per claim). A connection found broken is dropped
        with the rest of the pool (after a server restart they are all dead) and the error
        leaves as ConnectionLost: the claim may be made again."""
        try:
            with self._claims().connect() as conn:
                raw = conn.connection.driver_connection
                try:
                    yield conn, raw.cursor()
                except _PG_ERROR as exc:
                    if not (raw.broken or raw.closed):
                        raise
                    conn.invalidate()
                    self._claims().dispose()
                    raise _logged(exc, errors.ConnectionLost()) from exc
        except DRIVER_ERRORS as exc:
            raise_typed(exc)

    def _claims(self) -> Engine:
        pool = self._claim_pool
        if pool is None:
            kwargs = dict(self._engine_kwargs, pool_pre_ping=False, isolation_level="AUTOCOMMIT")
            pool = self._claim_pool = make_engine(self.url, self._statement_timeout_s, **kwargs)
            event.listen(pool, "connect", _generic_plans)
        return pool

    def dispose(self) -> None:
        """Close every pooled connection (the connector stays usable)."""
        self.engine.dispose()
        pool, self._claim_pool = self._claim_pool, None
        if pool is not None:
            pool.dispose()


def _generic_plans(dbapi_conn, _record) -> None:
    with dbapi_conn.cursor() as cur:
        cur.execute(queries.PG_CLAIM_CONNECT)


# libpq's own limits, so that a server that stops answering (a host gone from the network,
# not one refusing connections) is an error in seconds, not a request that hangs: a new
# connection gives up after connect_timeout, an open one whose data goes unacknowledged after
# tcp_user_timeout (ms), and an idle one is probed by TCP keepalives
PG_CONNECT = {"connect_timeout": 10, "tcp_user_timeout": 30_000, "keepalives": 1,
              "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# (none of them limits a server that still acknowledges TCP but answers nothing, a frozen
# one: the statement deadline does, STATEMENT_TIMEOUT_S and scheduler.deadline)


def make_engine(url: str, statement_timeout_s: float = 0, **kwargs) -> Engine:
    """An Engine for `sqlite:///path` (serialized writers) or `postgresql+psycopg://...`.

    On PostgreSQL, ``statement_timeout_s`` (0: none) is the server's statement_timeout (in
    libpq's ``options``, unless they set it), and with psycopg a connection that waits on
    its server longer than ``deadline.client_limit`` of it is closed: the statement fails as
    a lost connection, its transaction rolled back by the server."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_size", 8)
    kwargs.setdefault("pool_pre_ping", True)
    parsed = make_url(url)
    driver = parsed.get_driver_name()
    if driver in ("psycopg", "psycopg2"):   # libpq's settings: those the URL names win
        args = {**{k: v for k, v in PG_CONNECT.items() if k not in parsed.query},
                **kwargs.get("connect_args", {})}
        if statement_timeout_s:
            from lorry.scheduler.deadline import with_statement_timeout

            given = args.get("options", parsed.query.get("options"))
            given = " ".join(given) if isinstance(given, tuple) else given
            args["options"] = with_statement_timeout(given, statement_timeout_s)
        kwargs["connect_args"] = args
    engine = create_engine(url, **kwargs)
    if statement_timeout_s and driver == "psycopg":
        from lorry.scheduler.deadline import watch_waits

        watch_waits(engine, statement_timeout_s)
    event.listen(engine, "checkin", _bump_after_write)
    return engine


def _sqlite_connect(dbapi_conn, _record) -> None:
    # Take over transaction control from the driver, so BEGIN IMMEDIATE below is ours.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    for statement in queries.SQLITE_CONNECT:
        cur.execute(statement)
    cur.close()


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql(queries.SQLITE_BEGIN)


def _bump_after_write(_dbapi_conn, record) -> None:
    # A claim snapshot read while a queue write was still uncommitted took the generation the
    # write had already bumped, yet lacks its rows: bump again once the write's transaction is
    # over (its connection back in the pool), so such a snapshot is not reused.
    if record is not None and record.info.pop(WROTE_GROUPS, False):
        bump_generation()
