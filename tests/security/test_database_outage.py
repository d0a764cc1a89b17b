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
