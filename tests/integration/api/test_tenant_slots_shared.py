"""A tenant's open completions and batch ingests are counted across the service's API
processes (`lorry api --workers N`) through the real Redis: two apps over one database stand
for two processes, a killed subprocess for a process that died."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import redis
from fastapi.testclient import TestClient

from lorry.api.errors import ApiError
from lorry.api.tenant_slots import TenantSlots, slot_client
from lorry.testing import make_tiny_llama

REDIS = os.environ.get("LORRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
URL = urlsplit(REDIS)._replace(path="/13").geturl()  # a DB of its own for these tests


@pytest.fixture
def prefix():
    """A prefix of the test's own; its keys are dropped afterwards."""
    p = f"slots{uuid.uuid4().hex[:8]}"
    yield p
    client = redis.Redis.from_url(URL)
    for key in client.scan_iter(match=f"{p}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def two_processes(tmp_path, prefix):
    """Two apps (as two uvicorn workers would make) over one database and one Redis."""
    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.scheduler.migrate import upgrade
    from lorry.settings import Settings

    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    model = make_tiny_llama(tmp_path / "tiny-llama")
    settings = Settings(database_url=url, model=str(model), adapter_roots=[str(tmp_path)],
                        redis_prefix=prefix, max_open_completions=1, sync_timeout_seconds=2.0)
    queue = JobQueue(url)
    apps = [create_app(settings, queue=queue, nudger=None,
                       redis_client=redis.Redis.from_url(URL, socket_timeout=2))
            for _ in range(2)]
    yield apps, queue, settings
    queue.close()


def _client(app, key):
    c = TestClient(app)
    c.headers["Authorization"] = f"Bearer {key}"
    return c


def test_a_tenant_at_its_limit_on_one_api_process_is_refused_by_another(two_processes):
    """With `lorry api --workers 4` each process counted its own: a tenant had four times
    LORRY_MAX_OPEN_COMPLETIONS open at once."""
    (first, second), queue, settings = two_processes
    tenant_a, key_a = queue.create_tenant("tenant-a")
    _, key_b = queue.create_tenant("tenant-b")
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    with _client(first, key_a) as a1, _client(second, key_a) as a2, \
            _client(second, key_b) as b2:
        held = {}
        waiting = threading.Thread(target=lambda: held.setdefault(
            "r", a1.post("/v1/chat/completions", json=body)))
        waiting.start()     # no worker runs: it waits its sync timeout (2 s), then 504
        deadline = time.monotonic() + 2
        while not queue.list_jobs(tenant_a.id) and time.monotonic() < deadline:
            time.sleep(0.02)
        r = a2.post("/v1/chat/completions", json=body)
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "too_many_open_completions"
        assert "across this service's API processes" in error["message"]
        assert r.headers["Retry-After"] == "1"
        assert len(queue.list_jobs(tenant_a.id)) == 1   # nothing queued
        settings.sync_timeout_seconds = 0.3
        other = b2.post("/v1/chat/completions", json=body)   # another tenant is served
        assert other.status_code == 504, other.text
        waiting.join()
        assert held["r"].status_code == 504
        # the first process gave its slot back: the second serves the tenant again
        again = a2.post("/v1/chat/completions", json=body)
        assert again.status_code == 504, again.text


def test_the_slots_of_an_api_process_that_died_lapse(prefix):
    """A process killed while it held a tenant's slots must not lock the tenant out for
    good: its slots lapse once it stops renewing them, and not before."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, sys, time
        import redis
        from lorry.api.tenant_slots import TenantSlots, slot_client
        slots = TenantSlots("completions", redis.Redis.from_url({URL!r}), {prefix!r},
                            ttl=1.0, renew_every=0.2)
        for _ in range(2):
            asyncio.run(slots.enter("t1", 2))
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        here = TenantSlots("completions", redis.Redis.from_url(URL), prefix, ttl=1.0,
                           renew_every=0.2)
        with pytest.raises(ApiError) as e:
            asyncio.run(here.enter("t1", 2))
        assert e.value.status_code == 429
        assert "completions open (waiting or streaming) across this service's API " \
               "processes: 2, the most allowed" in e.value.detail
        time.sleep(2.0)     # twice its ttl: renewed by the living process, still held
        with pytest.raises(ApiError):
            asyncio.run(here.enter("t1", 2))
        assert asyncio.run(here.enter("t2", 2))          # another tenant's are its own
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 5
        while True:
            try:
                token = asyncio.run(here.enter("t1", 2))
                break
            except ApiError:
                assert time.monotonic() < deadline, "the dead process's slots never lapsed"
                time.sleep(0.1)
        asyncio.run(here.leave("t1", token))
        members = redis.Redis.from_url(URL).zrange(f"{prefix}:slots:completions:t1", 0, -1)
        assert members == []
    finally:
        holder.kill()
        holder.wait(10)


def test_without_redis_each_api_process_counts_its_own(prefix, caplog):
    """The embedded default runs no Redis: the limit then holds per process, each request
    answered at once (Redis asked again only after REDIS_RETRY seconds, not per request)."""
    down = slot_client("redis://127.0.0.1:1/0")     # what `lorry api` makes, nothing there
    slots = TenantSlots("ingests", down, prefix)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="lorry.api.tenant_slots"):
        tokens = [asyncio.run(slots.enter("t1", 2)) for _ in range(2)]
        with pytest.raises(ApiError) as e:
            asyncio.run(slots.enter("t1", 2))
    assert time.monotonic() - started < 1.5
    assert e.value.code == "too_many_open_ingests"
    assert "on this API process" in e.value.detail
    assert len([r for r in caplog.records if "Redis cannot be reached" in r.message]) == 1
    asyncio.run(slots.leave("t1", tokens[0]))
    assert asyncio.run(slots.enter("t1", 2))


def test_a_redis_that_stops_answering_holds_no_answer_back(prefix):
    """Slots were given back one at a time on one thread, each answer waiting for its own:
    with Redis frozen (not down) five answers went out at 2, 4, 6, 8 and 10 s (a review)."""
    frozen, released = threading.Event(), []

    class Frozen:
        """Takes slots, then stops answering (a release waits until ``frozen`` is set)."""

        def eval(self, script, n, *args):
            return [1, 1]

        def zrem(self, key, member):
            frozen.wait(10)
            released.append(member)

    slots = TenantSlots("completions", Frozen(), prefix)
    tokens = [asyncio.run(slots.enter("t1", 64)) for _ in range(5)]
    for token in tokens:
        asyncio.run(slots.leave("t1", token))   # each answer goes out, Redis or not
    assert released == [] and slots.open == {}  # all five left while Redis still hung
    frozen.set()
    deadline = time.monotonic() + 5
    while len(released) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(released) == 5                   # and Redis heard of each once it answered
