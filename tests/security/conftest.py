"""Security tests: the real app and job queue in-process on a SQLite file (the embedded
default), tiny random model and adapters built here; counts are read from the tables."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from lorry.testing import make_peft_adapter, make_tiny_llama

MAX_RANK = 16


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("sec-model") / "tiny-llama")


@pytest.fixture(scope="session")
def roots(tmp_path_factory, tiny_model):
    """(allowed root with a good adapter 'good' r8, a directory outside every root)."""
    root = tmp_path_factory.mktemp("sec-adapters")
    outside = tmp_path_factory.mktemp("sec-outside")
    make_peft_adapter(tiny_model, root / "good", r=8, seed=1)
    make_peft_adapter(tiny_model, outside / "elsewhere", r=8, seed=2)
    return root, outside


@pytest.fixture
def service(tmp_path, tiny_model, roots):
    """(app, queue, settings, db url) over a fresh migrated SQLite database, small limits."""
    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.settings import Settings

    url = f"sqlite:///{tmp_path / 'sec.db'}"
    settings = Settings(database_url=url, model=str(tiny_model), adapter_roots=[str(roots[0])],
                        max_lora_rank=MAX_RANK, max_batch_lines=20, max_line_bytes=4096,
                        max_body_bytes=32 * 1024, max_model_len=128)
    queue = JobQueue(url)
    app = create_app(settings, queue=queue, nudger=None, redis_client=None)
    yield app, queue, settings, url
    queue.close()


def client(app, key: str | None) -> TestClient:
    c = TestClient(app)
    if key is not None:
        c.headers["Authorization"] = f"Bearer {key}"
    return c


def _tenant_client(service, name: str):
    """A new tenant and a client holding its key (``.tenant``, ``.key``)."""
    app, queue, *_ = service
    tenant, key = queue.create_tenant(name)
    with client(app, key) as c:
        c.tenant, c.key = tenant, key
        yield c


@pytest.fixture
def alice(service):
    yield from _tenant_client(service, "alice")


@pytest.fixture
def bob(service):
    yield from _tenant_client(service, "bob")


def counts(url: str) -> dict[str, int]:
    """Rows per table that a refused request must leave unchanged."""
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("jobs", "adapters", "batches", "tenants", "queue_groups")}
    finally:
        eng.dispose()
