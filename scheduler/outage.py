"""Driver errors that mean "the database cannot be reached" become ``errors.Unavailable``,
converted once here so that callers decide by type, never by the driver's message."""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable

from sqlalchemy import exc as sa_exc

from lorry.scheduler import errors

log = logging.getLogger(__name__)

try:  # PostgreSQL's driver; the SQLite path runs without it
    import psycopg
    _PG_OUTAGES: tuple = (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover
    _PG_OUTAGES = ()

# Connection refused or dropped, server shutting down, pool exhausted, SQLite locked: the
# statement did not run (or its outcome is unknown) and the same call can succeed later.
OUTAGES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
    sa_exc.TimeoutError) + _PG_OUTAGES


def unavailable(exc: BaseException) -> errors.Unavailable:
    """The typed error for a driver error of ``OUTAGES`` (its cause is logged, not shown:
    it names hosts and ports)."""
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    log.warning("database unavailable: %s: %s", type(exc).__name__, cause[0] if cause else "")
    return errors.Unavailable()


def converts_outages(fn: Callable) -> Callable:
    """Wrap a method (or generator method) so that ``OUTAGES`` leave it as Unavailable."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except OUTAGES as exc:
                raise unavailable(exc) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OUTAGES as exc:
            raise unavailable(exc) from exc
    return wrapper


def convert_outages(cls: type, names: Iterable[str]) -> type:
    """Replace each named method of ``cls`` by its ``converts_outages`` wrapper."""
    for name in names:
        setattr(cls, name, converts_outages(getattr(cls, name)))
    return cls
