"""The database goes away under a real ``lorry api`` (a private PostgreSQL cluster stopped
with ``-m immediate``: every connection drops): every /v1 route and /metrics answer 503 with
Retry-After in the one error shape, never 500, and the API recovers by itself."""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest

METRICS_TOKEN = "outage-scrape"


@pytest.fixture
def api_on_private_pg(tmp_path, tiny_model, roots):
    """(api url, tenant key, PrivatePostgres, api Proc) with one queued job and one batch."""
    from chaos_harness import PrivatePostgres, RedisServer
    from procs import Proc, free_port, run_cli, wait_until

    from lorry.scheduler import JobQueue

    pg, redis = PrivatePostgres(), RedisServer()
    port = free_port()
    env = {**os.environ, "LORRY_DATABASE_URL": pg.url, "LORRY_BROKER_URL": redis.url,
           "LORRY_MODEL": str(tiny_model), "LORRY_ADAPTER_ROOTS": str(roots[0]),
           "LORRY_API_PORT": str(port), "LORRY_DATA_DIR": str(tmp_path),
           "LORRY_METRICS_TOKEN": METRICS_TOKEN, "LORRY_MAX_MODEL_LEN": "128",
           "LORRY_REDIS_PREFIX": "lorry-outage"}
    api = None
    try:
        run_cli(["db", "upgrade"], env)
        q = JobQueue(pg.url)
        _tenant, key = q.create_tenant("outage")
        q.close()
        api = Proc("api", ["api"], env, tmp_path)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 90, "the API", [api])
        yield base, key, pg, api
    finally:
        if api is not None:
            api.stop()
        pg.destroy()
        redis.kill()


def _requests(base: str, key: str, job_id: str, batch_id: str):
    """Every /v1 route and /metrics, as (label, callable returning a response)."""
    auth = {"Authorization": f"Bearer {key}"}
    line = json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "base", "prompt": "x", "max_tokens": 2}}).encode()
    c = httpx.Client(base_url=base, headers=auth, timeout=30)
    return [
        ("submit", lambda: c.post("/v1/jobs", json={"prompt": "during"})),
        ("list", lambda: c.get("/v1/jobs")),
        ("get", lambda: c.get(f"/v1/jobs/{job_id}")),
        ("cancel", lambda: c.post(f"/v1/jobs/{job_id}/cancel")),
        ("batch", lambda: c.post("/v1/batches", content=line)),
        ("batch get", lambda: c.get(f"/v1/batches/{batch_id}")),
        ("batch cancel", lambda: c.post(f"/v1/batches/{batch_id}/cancel")),
        ("batch output", lambda: c.get(f"/v1/batches/{batch_id}/output")),
        ("batch errors", lambda: c.get(f"/v1/batches/{batch_id}/errors")),
        ("adapters", lambda: c.get("/v1/adapters")),
        ("adapter add", lambda: c.post("/v1/adapters", json={"name": "n", "source": "o/r"})),
        ("adapter delete", lambda: c.delete("/v1/adapters/n")),
        ("metrics", lambda: c.get("/metrics", headers={
            "Authorization": f"Bearer {METRICS_TOKEN}"})),
    ]


def test_database_down_is_503_with_retry_after_and_recovers(api_on_private_pg):
    from lorry.client import Client
    from lorry.errors import Unavailable, WaitTimeout

    base, key, pg, api = api_on_private_pg
    auth = {"Authorization": f"Bearer {key}"}
    job = httpx.post(f"{base}/v1/jobs", json={"prompt": "before"}, headers=auth, timeout=30)
    assert job.status_code == 201, job.text
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", ' \
           b'"body": {"model": "base", "prompt": "x"}}'
    batch = httpx.post(f"{base}/v1/batches", content=line, headers=auth, timeout=30)
    assert batch.status_code == 201, batch.text
    requests = _requests(base, key, job.json()["id"], batch.json()["id"])

    pg.stop("immediate")
    for label, send in requests:
        r = send()
        assert r.status_code == 503, (label, r.status_code, r.text)
        assert int(r.headers["Retry-After"]) > 0, label
        assert r.json() == {"error": {
            "message": "the job database cannot be reached; try again later",
            "type": "service_unavailable_error", "param": None,
            "code": "database_unavailable"}}, (label, r.text)
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
    # without a key it is still 401: nothing about the outage is told to strangers
    assert httpx.get(f"{base}/v1/jobs", timeout=30).status_code == 401
    # the Python client raises a typed error carrying the server's Retry-After
    with Client(base, key) as client:
        with pytest.raises(Unavailable) as e:
            client.get(job.json()["id"])
        assert e.value.status == 503 and e.value.retry_after == 5
        assert e.value.code == "database_unavailable"
        with pytest.raises(WaitTimeout, match="server unavailable"):
            client.wait(job.json()["id"], timeout=1)

    pg.start()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(f"{base}/v1/jobs", headers=auth, timeout=30)
        seen.append(r.status_code)
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert seen[-1] == 200 and set(seen) <= {200, 503}, seen
    statuses = {label: send().status_code for label, send in requests}
    assert all(s < 500 for s in statuses.values()), statuses
    assert statuses["submit"] == 201 and statuses["metrics"] == 200, statuses
    ids = [j["id"] for j in httpx.get(f"{base}/v1/jobs", headers=auth, timeout=30
                                      ).json()["data"]]
    assert job.json()["id"] in ids
    assert api.alive(), api.tail()


def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _waiting_for_a_lock(dsn: str, timeout: float = 30.0) -> int:
    """The pid of the backend of this database that waits for a row lock."""
    import psycopg
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as admin:
        while time.monotonic() < deadline:
            row = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                                "current_database() AND wait_event_type = 'Lock'").fetchone()
            if row:
                return row[0]
            time.sleep(0.05)
    raise AssertionError("no request waited for the row lock")


def test_a_connection_lost_mid_request_is_503_and_the_next_request_works(tiny_model, roots):
    """The API's connection dies during a request (its backend terminated while it waits for
    a row lock): errors.ConnectionLost, answered 503 with Retry-After in the one error shape;
    the pool opens a new connection for the next request."""
    import threading

    import psycopg

    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.settings import Settings
    from tests.integration.scheduler.conftest import migrated_pg_database
    from tests.security.conftest import client

    with migrated_pg_database() as url:
        queue = JobQueue(url)
        try:
            settings = Settings(database_url=url, model=str(tiny_model),
                                adapter_roots=[str(roots[0])], max_model_len=128)
            app = create_app(settings, queue=queue, nudger=None, redis_client=None)
            _tenant, key = queue.create_tenant("lost")
            with client(app, key) as c:
                job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
                answer = {}
                with psycopg.connect(_pg_dsn(url)) as holder:  # holds the job's row lock
                    holder.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                    cancel = threading.Thread(target=lambda: answer.update(
                        r=c.post(f"/v1/jobs/{job_id}/cancel")))
                    cancel.start()
                    pid = _waiting_for_a_lock(_pg_dsn(url))
                    with psycopg.connect(_pg_dsn(url), autocommit=True) as admin:
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    cancel.join(30)
                r = answer["r"]
                assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.text
                assert r.json() == {"error": {
                    "message": "the job database cannot be reached; try again later",
                    "type": "service_unavailable_error", "param": None,
                    "code": "database_unavailable"}}
                assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
                assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        finally:
            queue.close()


@pytest.mark.parametrize(("error", "status", "code"), [
    ("ConnectionLost", 503, "database_unavailable"),
    ("Retryable", 503, "database_unavailable"),
    ("DuplicateKey", 409, "conflict")])
def test_typed_queue_errors_have_their_status_in_the_one_shape(service, alice, monkeypatch,
                                                                 error, status, code):
    from lorry.scheduler import errors

    queue = service[1]
    raised = getattr(errors, error)()

    def refuse(*_args, **_kwargs):
        raise raised
    monkeypatch.setattr(queue, "list_jobs", refuse)
    r = alice.get("/v1/jobs")
    assert r.status_code == status, r.text
    assert (r.headers.get("Retry-After") == "5") == (status == 503)
    assert r.json() == {"error": {"message": str(raised), "type": {
        503: "service_unavailable_error", 409: "conflict_error"}[status], "param": None,
        "code": code}}
