"""Health, readiness and Prometheus metrics."""
from __future__ import annotations

from tests.unit.api.conftest import finish_all


def test_health_and_ready(tenant_a):
    assert tenant_a.get("/healthz").json() == {"status": "ok"}
    assert tenant_a.get("/readyz").json() == {"status": "ok"}


def _with_metrics_token(service, token="scrape-me", **more):
    """Give the running app a metrics token (and other settings); return the auth header."""
    from pydantic import SecretStr

    app = service[0]
    app.state.settings = app.state.settings.model_copy(
        update={"metrics_token": SecretStr(token), **more})
    return {"Authorization": f"Bearer {token}"}


def test_metrics_count_jobs_by_status(service, tenant_a):
    _, queue, *_ = service
    auth = _with_metrics_token(service)
    for i in range(3):
        tenant_a.post("/v1/jobs", json={"prompt": f"p{i}"})
    text = tenant_a.get("/metrics", headers=auth).text
    assert 'lorry_jobs{status="queued"} 3.0' in text
    assert "lorry_api_jobs_submitted_total 3.0" in text
    assert tenant_a.tenant.id not in text and "tenant=" not in text
    finish_all(queue)
    assert 'lorry_jobs{status="queued"} 0.0' in tenant_a.get("/metrics", headers=auth).text


def test_metrics_need_the_token_and_are_off_without_one(service, tenant_a):
    r = tenant_a.get("/metrics")  # a tenant's API key is not the metrics token
    assert r.status_code == 404 and r.json()["error"]["code"] == "metrics_disabled"
    _with_metrics_token(service)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2NyYXBlLW1l"}):
        r = tenant_a.get("/metrics", headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
        assert r.json()["error"]["code"] == "invalid_metrics_token"
        assert "lorry_jobs" not in r.text


def test_openapi_lists_the_routes(tenant_a):
    paths = tenant_a.get("/openapi.json").json()["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/batches",
              "/v1/batches/{batch_id}/output", "/v1/adapters", "/metrics"):
        assert p in paths
