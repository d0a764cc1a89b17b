"""Client tests run against the real app (TestClient transport) on a SQLite job table."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.unit.api.conftest import adapter_root, service, tiny_model  # noqa: F401  (fixtures)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean LORRY_* environment with its data under tmp_path; returns monkeypatch."""
    import os

    for name in [n for n in os.environ if n.startswith("LORRY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LORRY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORRY_MODELS_DIR", str(tmp_path / "models"))
    return monkeypatch


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
