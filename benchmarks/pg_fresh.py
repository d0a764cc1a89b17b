"""Throwaway PostgreSQL databases for the benchmarks (one per run, dropped after)."""
from __future__ import annotations

import uuid

import psycopg
from sqlalchemy.engine import make_url


def pg_dsn(url: str, database: str | None = None) -> str:
    """A psycopg DSN for the server of SQLAlchemy ``url`` (its database, or ``database``)."""
    u = make_url(url).set(drivername="postgresql")
    if database:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


def fresh_database(url: str, name: str | None = None, prefix: str = "lorry_bench") -> tuple[str, str]:
    """Create an empty database (``name``, or ``prefix`` + a random suffix) on the server of
    ``url``, dropping one of that name first; returns (name, its SQLAlchemy URL)."""
    name = name or f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, name: str) -> None:
    with psycopg.connect(pg_dsn(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
