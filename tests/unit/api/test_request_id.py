"""x-request-id on every answer (OpenAI's header; the SDK's ``_request_id``), and 409s the
official SDKs must not retry."""
from __future__ import annotations

import re

import openai
from fastapi.testclient import TestClient

RID = re.compile(r"req_[0-9a-f]{32}")


def test_every_answer_carries_its_own_request_id(service, tenant_a):
    app, *_ = service
    answers = [
        tenant_a.get("/healthz"),
        tenant_a.get("/v1/jobs"),                                   # 200
        TestClient(app).get("/v1/jobs"),                            # 401, no key
        tenant_a.post("/v1/jobs", json={"prompt": "x", "sampling": {"top_k": -5}}),   # 422
        tenant_a.post("/v1/jobs", content=b"{" * 10_000,            # refused by BodyGuard
                      headers={"content-type": "application/json"}),
    ]
    assert [a.status_code for a in answers] == [200, 200, 401, 422, 413]
    ids = [a.headers.get("x-request-id") for a in answers]
    assert all(i and RID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_a_clients_own_request_id_is_not_taken(tenant_a):
    r = tenant_a.get("/healthz", headers={"x-request-id": "req_forged\r\nx-evil: 1"})
    assert RID.fullmatch(r.headers["x-request-id"]) and "x-evil" not in r.headers


def test_the_sdk_shows_the_request_id(service):
    app, queue, *_ = service
    _, key = queue.create_tenant("sdk-user")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                           http_client=TestClient(app))
    page = client.models.list()
    assert RID.fullmatch(page._request_id or ""), page._request_id


def test_a_taken_adapter_name_is_not_retried_by_the_sdks(tenant_a, adapter_root):
    body = {"name": "beta", "source": str(adapter_root / "beta")}
    assert tenant_a.post("/v1/adapters", json=body).status_code == 201
    again = tenant_a.post("/v1/adapters", json=body)
    assert again.status_code == 409 and again.headers["x-should-retry"] == "false"


def test_a_crash_answers_500_with_its_request_id_and_logs_it(service, caplog, monkeypatch):
    app, queue, *_ = service
    _, key = queue.create_tenant("crash")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(queue, "list_jobs", broken)
    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    # the server drops the connection after a crash: the client is told not to reuse it
    # (the next request on it met a reset: a bulk audit)
    assert r.headers["connection"] == "close"
    rid = r.headers.get("x-request-id", "")
    assert RID.fullmatch(rid)
    assert any(rid in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")
