"""Chaos fixtures: a tiny model with adapters, a private Redis that tests may kill, a fresh
database on the shared PostgreSQL (or a private cluster that tests may restart)."""
from __future__ import annotations

import json
import os
import uuid

import pytest
from chaos_harness import PrivatePostgres, RedisServer

from lorry.testing import make_tiny_llama, write_random_adapter

PG = os.environ.get("LORRY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ADAPTERS = [f"ad{i}" for i in range(4)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(root, model dir, adapter root) with adapters ad0..ad3 (r4, q/v)."""
    root = tmp_path_factory.mktemp("chaos")
    model = make_tiny_llama(root / "tiny-llama")
    cfg = json.loads((model / "config.json").read_text())
    for i, name in enumerate(ADAPTERS):
        write_random_adapter(root / "adapters" / name, cfg, r=4, seed=i,
                             base_model_name_or_path=str(model))
    return root, model, root / "adapters"


def _fresh_db():
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"lorry_chaos_{uuid.uuid4().hex[:10]}"
    dsn = make_url(PG).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(PG).set(database=name).render_as_string(hide_password=False), dsn, name


@pytest.fixture(scope="module")
def database_url():
    import psycopg

    url, dsn, name = _fresh_db()
    yield url
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def private_pg():
    """A PostgreSQL cluster of this test's own (the shared one is never restarted)."""
    pg = PrivatePostgres()
    yield pg
    pg.destroy()
