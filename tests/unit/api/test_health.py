"""Health, readiness and Prometheus metrics."""
from __future__ import annotations

import re

from tests.unit.api.conftest import finish_all


def test_health_and_ready(tenant_a):
    assert tenant_a.get("/healthz").json() == {"status": "ok"}
    assert tenant_a.get("/readyz").json() == {"status": "ok"}


def test_metrics_count_jobs_by_status(service, tenant_a):
    _, queue, *_ = service
    for i in range(3):
        tenant_a.post("/v1/jobs", json={"prompt": f"p{i}"})
    text = tenant_a.get("/metrics").text
    queued = re.search(r'lorry_jobs\{adapter="",status="queued",tenant="[^"]+"\} (\S+)', text)
    assert queued and float(queued.group(1)) == 3.0
    assert "lorry_api_jobs_submitted_total 3.0" in text
    finish_all(queue)
    assert 'status="queued"' not in tenant_a.get("/metrics").text


def test_openapi_lists_the_routes(tenant_a):
    paths = tenant_a.get("/openapi.json").json()["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/batches",
              "/v1/batches/{batch_id}/output", "/v1/adapters", "/metrics"):
        assert p in paths
