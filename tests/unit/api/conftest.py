"""API tests: the real app and the real job queue on a SQLite file, no worker, no Redis."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lorry.testing import make_peft_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, tiny_model):
    """An allowed adapter root holding two valid adapters (r8 q/v, r16 all-linear)."""
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(tiny_model, root / "alpha", r=8, seed=1)
    make_peft_adapter(tiny_model, root / "beta", r=16, target_modules="all-linear", seed=2)
    return root


class Nudges:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1
        return True


@pytest.fixture
def service(tmp_path, tiny_model, adapter_root):
    """(app, queue, settings, nudges) over a fresh migrated SQLite database."""
    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.scheduler.migrate import upgrade
    from lorry.settings import Settings

    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    settings = Settings(database_url=url, model=str(tiny_model), adapter_roots=[str(adapter_root)],
                        max_lora_rank=16, max_batch_lines=50, max_line_bytes=4096,
                        max_body_bytes=64 * 1024)
    queue = JobQueue(url)
    nudges = Nudges()
    app = create_app(settings, queue=queue, nudger=nudges, redis_client=None)
    yield app, queue, settings, nudges


def _client(app, key):
    c = TestClient(app)
    c.headers["Authorization"] = f"Bearer {key}"
    return c


@pytest.fixture
def tenant_a(service):
    app, queue, *_ = service
    tenant, key = queue.create_tenant("tenant-a")
    with _client(app, key) as c:
        c.tenant = tenant
        yield c


@pytest.fixture
def tenant_b(service):
    app, queue, *_ = service
    tenant, key = queue.create_tenant("tenant-b")
    with _client(app, key) as c:
        c.tenant = tenant
        yield c


def finish_all(queue, text_of=lambda job: f"echo {job.prompt or job.messages[-1]['content']}"):
    """Play a worker: claim everything queued and complete it (5 prompt tokens, 2 of them
    cached, 3 completion tokens), or fail jobs whose prompt says 'FAIL'; returns the number of
    jobs written."""
    from lorry.scheduler import Result

    done = 0
    while True:
        batches = queue.claim("test-worker", [], [], 64)
        if not batches:
            return done
        for mb in batches:
            for job in mb.jobs:
                if "FAIL" in (job.prompt or ""):
                    queue.fail(job.id, job.lease_token, "boom", retryable=False)
                else:
                    text = text_of(job)
                    queue.complete(job.id, job.lease_token,
                                   Result(text, [1, 2, 3], "length", 5, 3, 2))
                done += 1
