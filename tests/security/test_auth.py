"""Auth and tenant isolation: hashed keys, 401 without a valid key, 404 across tenants, 429
with Retry-After past a tenant's quota, Flower behind basic auth on every page (its
/metrics and /healthcheck included)."""
from __future__ import annotations

import os

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.security.conftest import client, counts

ROUTES = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/job_x"),
          ("POST", "/v1/jobs/job_x/cancel"), ("POST", "/v1/batches"),
          ("GET", "/v1/batches/batch_x"), ("GET", "/v1/batches/batch_x/output"),
          ("POST", "/v1/adapters"), ("GET", "/v1/adapters"), ("DELETE", "/v1/adapters/x")]


def test_keys_are_stored_hashed(service, alice):
    url = service[3]
    secret = alice.key.split("_", 2)[2]
    eng = create_engine(url)
    with eng.connect() as conn:
        dump = " ".join(str(v) for table in ("tenants", "jobs", "adapters", "batches")
                        for row in conn.execute(text(f"SELECT * FROM {table}")) for v in row)
        stored = conn.execute(text("SELECT key_hash FROM tenants WHERE name = 'alice'")).scalar()
    eng.dispose()
    assert secret not in dump and alice.key not in dump
    assert len(stored) == 64 and int(stored, 16) >= 0  # a sha256 hex digest


@pytest.mark.parametrize("method, path", ROUTES)
def test_missing_or_invalid_key_is_401(service, alice, method, path):
    app, _, _, url = service
    tampered = alice.key[:-2] + ("AA" if not alice.key.endswith("AA") else "BB")
    before = counts(url)
    for key, scheme in ((None, None), ("garbage", "Bearer"), (tampered, "Bearer"),
                        (alice.key, "Basic")):
        c = client(app, None)
        if key is not None:
            c.headers["Authorization"] = f"{scheme} {key}"
        r = c.request(method, path, json={"prompt": "x"})
        assert r.status_code == 401, (key, r.text)
        assert "API key" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert counts(url) == before


def test_another_tenants_objects_are_404(service, alice, bob, roots):
    url = service[3]
    job = alice.post("/v1/jobs", json={"prompt": "secret"}).json()
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", ' \
           b'"body": {"model": "base", "prompt": "x"}}'
    batch = alice.post("/v1/batches", content=line).json()
    assert alice.post("/v1/adapters", json={"name": "mine", "source": str(roots[0] / "good")}
                      ).status_code == 201
    before = counts(url)
    for method, path in (("GET", f"/v1/jobs/{job['id']}"),
                         ("POST", f"/v1/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/batches/{batch['id']}"),
                         ("POST", f"/v1/batches/{batch['id']}/cancel"),
                         ("GET", f"/v1/batches/{batch['id']}/output"),
                         ("GET", f"/v1/batches/{batch['id']}/errors"),
                         ("DELETE", "/v1/adapters/mine")):
        r = bob.request(method, path)
        assert r.status_code == 404 and "no " in r.json()["error"]["message"], (path, r.text)
    assert counts(url) == before
    assert bob.get("/v1/jobs").json()["data"] == []
    assert bob.get("/v1/jobs", params={"batch_id": batch["id"]}).json()["data"] == []
    assert bob.get("/v1/adapters").json()["data"] == []
    assert alice.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_quota_is_429_with_retry_after_and_nothing_queued(service):
    app, queue, _, url = service
    _tenant, key = queue.create_tenant("capped", max_queued=3)
    c = client(app, key)
    for i in range(3):
        assert c.post("/v1/jobs", json={"prompt": f"p{i}"}).status_code == 201
    before = counts(url)
    r = c.post("/v1/jobs", json={"prompt": "one too many"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert "3" in r.json()["error"]["message"] and r.json()["error"]["code"] == "quota_exceeded"
    lines = b"".join(b'{"custom_id": "c%d", "method": "POST", "url": "/v1/completions", '
                     b'"body": {"model": "base", "prompt": "x"}}\n' % i for i in range(2))
    r = c.post("/v1/batches", content=lines)
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert "x-should-retry" not in r.headers
    assert counts(url) == before
    # more than the whole quota can never be queued: said so, and not worth retrying
    many = b"".join(b'{"custom_id": "m%d", "method": "POST", "url": "/v1/completions", '
                    b'"body": {"model": "base", "prompt": "x"}}\n' % i for i in range(4))
    r = client(app, queue.create_tenant("capped-too", max_queued=3)[1]).post(
        "/v1/batches", content=many)
    assert (r.status_code, r.json()["error"]["code"]) == (429, "quota_exceeded")
    assert r.headers["x-should-retry"] == "false" and "Retry-After" not in r.headers
    assert "can never be queued: submit at most 3 at a time" in r.json()["error"]["message"]
    assert counts(url)["jobs"] == before["jobs"]
    # another tenant is not held back by this one's quota
    _, other = queue.create_tenant("free")
    assert client(app, other).post("/v1/jobs", json={"prompt": "x"}).status_code == 201


def test_flower_requires_basic_auth(tmp_path):
    from chaos_harness import RedisServer
    from procs import Proc, free_port, wait_until

    redis = RedisServer()
    port = free_port()
    env = {**os.environ, "LORRY_BROKER_URL": redis.url,
           "LORRY_FLOWER_BASIC_AUTH": "ops:s3cret", "LORRY_DATA_DIR": str(tmp_path)}
    flower = Proc("flower", ["flower", "--port", str(port)], env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/healthcheck", auth=("ops", "s3cret"),
                                     timeout=5).status_code == 200, 60, "Flower", [flower])
        for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks", "/metrics",
                     "/healthcheck"):
            assert httpx.get(base + path, timeout=5).status_code == 401, path
            assert httpx.get(base + path, auth=("ops", "wrong"), timeout=5).status_code == 401
        for path in ("/api/workers", "/metrics", "/healthcheck"):
            assert httpx.get(base + path, auth=("ops", "s3cret"), timeout=10).status_code == 200
    finally:
        flower.stop()
        redis.kill()
