"""Fuzz the REST API from its own OpenAPI schema (schemathesis): no input gives a 5xx."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.security.conftest import client, counts


def test_no_generated_request_gives_a_server_error(service):
    app, queue, _, url = service
    _, key = queue.create_tenant("fuzzer")
    client(app, key).post("/v1/jobs", json={"prompt": "seed job"})  # a real row to hit
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {key}"}
    seen: list[tuple[str, str, int]] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 10  # every route of the API is fuzzed

    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers=headers)
            seen.append((case.method, case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.formatted_path, case.body,
                                                response.text[:500])
        fuzz()
    assert len(seen) >= len(operations)
    assert counts(url)["tenants"] == 1  # nothing the fuzzer sent created a tenant
