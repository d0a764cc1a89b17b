"""Client tests run against the real app (TestClient transport) on a SQLite job table."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.unit.api.conftest import adapter_root, service, tiny_model  # noqa: F401  (fixtures)


@pytest.fixture
def make_client(service):  # noqa: F811
    """make_client(tenant_name) -> (lorry.Client, TenantInfo)."""
    from lorry.client import Client

    app, queue, *_ = service
    opened = []

    def make(name: str):
        tenant, key = queue.create_tenant(name)
        client = Client("http://testserver", key, http_client=TestClient(app))
        opened.append(client)
        return client, tenant

    yield make
    for c in opened:
        c.close()
