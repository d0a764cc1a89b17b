"""How long one statement may wait on PostgreSQL: the server's statement_timeout cancels a slow
statement, and a watchdog closes the socket of a connection whose server does not answer at
all (frozen while the host's kernel still acknowledges TCP, where libpq would wait for ever)."""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time

import psycopg
from sqlalchemy import Engine, event

log = logging.getLogger(__name__)

SWEEP_S = 1.0       # how often the watchdog looks at the waits
MAX_GRACE_S = 10.0  # past the deadline, for the server's own cancel to arrive first


def client_limit(timeout_s: float) -> float:
    """Seconds a wait on the server may last before its connection is closed: the statement
    deadline plus as much again, at most MAX_GRACE_S (the server cancels at the deadline)."""
    return timeout_s + min(timeout_s, MAX_GRACE_S)


def with_statement_timeout(options: str | None, timeout_s: float) -> str:
    """libpq ``options`` that set the server's statement_timeout (ms), added to those given
    unless they set it themselves."""
    if options and "statement_timeout" in options:
        return options
    ms = max(1, round(timeout_s * 1000))
    return f"{options or ''} -c statement_timeout={ms}".strip()


class Watchdog:
    """The process's waits on PostgreSQL sockets, and one daemon thread that closes (shuts
    down) the socket of a wait past its limit, so libpq's blocked read ends with an error. A
    wait is registered only while its thread is inside psycopg's wait: an idle connection,
    pooled or checked out, is never touched."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # (a forked child holds copies of the parent's sockets, not its waiting threads:
        # shutting one down there would cut the parent's connection)
        self._lock = threading.Lock()
        # token -> (fd, the socket's identity, due, limit)
        self._waits: dict[int, tuple[int, tuple | None, float, float]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def begin(self, fd: int, limit_s: float) -> int:
        with self._lock:
            token = next(self._tokens)
            self._waits[token] = (fd, _identity(fd), time.monotonic() + limit_s, limit_s)
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="lorry-db-watchdog",
                                          daemon=True)
                thread.start()          # (kept only once started: a failed start is retried)
                self._thread = thread
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._waits.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(SWEEP_S)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one sweep
                log.exception("the database watchdog's sweep failed")

    def sweep(self, now: float | None = None) -> int:
        """Close the sockets of the waits past their limit; returns how many."""
        now = time.monotonic() if now is None else now
        # The lock is held while cutting: the owner of a wait cannot end it (and go on to
        # close its socket, whose number may then be reused) until the cut is done.
        with self._lock:
            late = [self._waits.pop(t) for t, (_, _, due, _) in list(self._waits.items())
                    if due <= now]
            for fd, ident, _, _ in late:
                _shut_down(fd, ident)
        for _, _, _, limit in late:
            log.warning("a wait on the job database lasted %.0f s, past the statement "
                        "deadline: "
                        "closed that connection (a frozen or cut-off server)", limit)
        return len(late)


def _identity(fd: int) -> tuple | None:
    """(device, inode) of the socket ``fd`` names: libpq may close it inside a wait (a read
    error) and the number be reused by another socket before the wait ends."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _shut_down(fd: int, ident: tuple | None = None) -> None:
    # On a duplicate of the descriptor, which libpq keeps (and closes itself): the shutdown
    # reaches the one socket both name, so the blocked read returns end-of-file.
    try:
        dup = os.dup(fd)
    except OSError as e:
        log.debug("cannot duplicate a late database socket: %s", e)
        return
    if ident is not None and _identity(dup) != ident:   # another socket now: not ours
        os.close(dup)
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError as e:  # no longer a socket
        os.close(dup)
        log.debug("a late database descriptor is no socket: %s", e)
        return
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as e:  # already shut down, or closed by the peer
            log.debug("shutdown of a late database socket: %s", e)


WATCHDOG = Watchdog()


class DeadlineConnection(psycopg.Connection):
    """A psycopg connection whose every wait on the server (statement, fetch, COPY, commit,
    rollback, pre-ping) is watched: past ``wait_limit_s`` its socket is shut down and the wait
    fails with OperationalError, a broken connection (SQLAlchemy's disconnect)."""

    wait_limit_s: float | None = None

    def wait(self, gen, *args, **kwargs):
        if self.wait_limit_s is None or kwargs.get("timeout") is not None:
            return super().wait(gen, *args, **kwargs)  # (a caller's own timeout bounds it)
        try:
            fd = self.pgconn.socket
        except psycopg.OperationalError:  # closed: psycopg's own wait raises the error
            return super().wait(gen, *args, **kwargs)
        token = WATCHDOG.begin(fd, self.wait_limit_s)
        try:
            return super().wait(gen, *args, **kwargs)
        finally:
            WATCHDOG.end(token)


def watch_waits(engine: Engine, timeout_s: float) -> None:
    """Open the engine's psycopg connections as DeadlineConnection, their waits limited to
    ``client_limit(timeout_s)``."""
    @event.listens_for(engine, "do_connect")
    def _connect(_dialect, _record, cargs, cparams):
        conn = DeadlineConnection.connect(*cargs, **cparams)
        conn.wait_limit_s = client_limit(timeout_s)       # (the query below is watched too)
        # the server's own statement_timeout when longer (the URL's options, a role's or
        # database's setting the options did not replace): a statement it lets run is not cut
        conn.wait_limit_s = client_limit(max(timeout_s, _server_timeout_s(conn)))
        return conn


def _server_timeout_s(conn) -> float:
    """The connection's statement_timeout in seconds (0: none, or unknown)."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT setting::bigint FROM pg_settings "
                        "WHERE name = 'statement_timeout'")
            row = cur.fetchone()
        conn.rollback()
    except psycopg.Error:
        return 0.0
    return (row[0] or 0) / 1000.0 if row else 0.0
