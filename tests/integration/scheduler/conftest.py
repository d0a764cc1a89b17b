"""Queue databases for the scheduler's integration tests: SQLite and the real PostgreSQL,
a fresh database per test module (created here, dropped after), emptied before each test."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta

import psycopg
import pytest
from sqlalchemy import delete
from sqlalchemy.engine import make_url

from lorry.scheduler import JobQueue
from lorry.scheduler.migrate import upgrade
from lorry.scheduler.models import Base

PG_URL = os.environ.get("LORRY_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin_dsn() -> str:
    return make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def create_pg_database() -> tuple[str, str]:
    name = f"lorry_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name, make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(name: str) -> None:
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def migrated_pg_database():
    """A fresh PostgreSQL database at the head migration; dropped on exit."""
    name, url = create_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory):
    """A migrated, empty queue database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('queue') / 'queue.db'}"
        upgrade(url)
        yield url
        return
    with migrated_pg_database() as url:
        yield url


class FakeClock:
    """Time the test moves by hand (naive UTC), so no test sleeps or races the wall clock."""

    def __init__(self):
        self.t = datetime(2026, 11, 29, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_queue(db_url, clock):
    """JobQueue factory on the module's database, emptied first; closed after the test."""
    made = []
    q0 = JobQueue(db_url, create=False)
    with q0.engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(delete(table))
    q0.close()

    def make(**kwargs) -> JobQueue:
        kwargs.setdefault("clock", clock)
        q = JobQueue(db_url, create=False, **kwargs)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


@pytest.fixture
def queue(make_queue) -> JobQueue:
    return make_queue()


@pytest.fixture
def fresh_pg_url():
    """An empty (unmigrated) PostgreSQL database for this test; dropped after."""
    name, url = create_pg_database()
    yield url
    drop_pg_database(name)
