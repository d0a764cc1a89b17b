"""e2e: API, Celery GPU worker (tiny model, CPU), beat and Flower as real processes on the real
PostgreSQL (a fresh database per session) and Redis (its own DB number and key prefix)."""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
import redis as redis_lib
from procs import Proc, free_port, run_cli, wait_until
from sqlalchemy.engine import make_url

from lorry.testing import make_peft_adapter, make_tiny_llama

PG = os.environ.get("LORRY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("LORRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
E2E_REDIS_DB = 11
FLOWER_AUTH = ("e2e", "flower-pw")
METRICS_TOKEN = "e2e-scrape"


@pytest.fixture(scope="session")
def database_url():
    import psycopg

    name = f"lorry_e2e_{uuid.uuid4().hex[:10]}"
    admin = make_url(PG).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(PG).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url():
    url = urlsplit(REDIS)._replace(path=f"/{E2E_REDIS_DB}").geturl()
    r = redis_lib.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()
    r.close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = make_tiny_llama(root / "tiny-llama")
    adapters_dir = root / "adapters"
    adapters = {"alpha": make_peft_adapter(model, adapters_dir / "alpha", r=8, seed=1),
                "beta": make_peft_adapter(model, adapters_dir / "beta", r=16, seed=2,
                                          target_modules="all-linear")}
    return root, model, adapters


@pytest.fixture(scope="session")
def stack(tiny, database_url, redis_url):
    """Start migrate (CLI), api, worker, beat and flower; yield their addresses and env."""
    root, model, adapters = tiny
    api_port, flower_port = free_port(), free_port()
    env = {**os.environ, "LORRY_DATABASE_URL": database_url, "LORRY_BROKER_URL": redis_url,
           "LORRY_MODEL": str(model), "LORRY_ADAPTER_ROOTS": str(root / "adapters"),
           "LORRY_DEVICE": "cpu", "LORRY_MAX_LORAS": "2", "LORRY_MAX_LORA_RANK": "16",
           "LORRY_MAX_CPU_LORAS": "4", "LORRY_MAX_NUM_SEQS": "4", "LORRY_MAX_MODEL_LEN": "128",
           "LORRY_REDIS_PREFIX": f"lorry-e2e-{uuid.uuid4().hex[:6]}",
           "LORRY_MAINTAIN_INTERVAL": "2", "LORRY_HEARTBEAT_SECONDS": "1",
           "LORRY_WORKER_ID": "e2e-gpu-worker", "LORRY_API_PORT": str(api_port),
           "LORRY_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH), "LORRY_DATA_DIR": str(root),
           "LORRY_METRICS_TOKEN": METRICS_TOKEN, "LORRY_BODY_IDLE_SECONDS": "3"}
    run_cli(["db", "upgrade"], env)
    logs = root / "logs"
    logs.mkdir()
    procs = [Proc("flower", ["flower", "--port", str(flower_port)], env, logs),
             Proc("api", ["api"], env, logs),
             Proc("worker", ["worker", "--name", "e2e-gpu@%h"], env, logs),
             Proc("beat", ["beat", "--schedule", str(root / "beat-schedule")], env, logs)]
    api = f"http://127.0.0.1:{api_port}"
    flower = f"http://127.0.0.1:{flower_port}"
    try:
        wait_until(lambda: httpx.get(f"{api}/readyz").status_code == 200, 60, "the API", procs)
        wait_until(lambda: "e2e-gpu@" in httpx.get(f"{flower}/api/workers?refresh=1",
                                                   auth=FLOWER_AUTH, timeout=10).text,
                   120, "Flower to list the worker", procs)
        yield {"api": api, "flower": flower, "env": env, "procs": procs, "adapters": adapters,
               "model": model}
    finally:
        for p in reversed(procs):
            p.stop()


def create_tenant(stack, name: str) -> str:
    """`lorry tenant create` (the CLI) -> the printed API key."""
    out = run_cli(["tenant", "create", name], stack["env"])
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("api key"))
