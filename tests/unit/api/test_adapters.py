"""Adapter registration: allowed roots (symlinks resolved), engine validation rules, tenancy."""
from __future__ import annotations

import os

import pytest

from lorry.testing import make_peft_adapter


def test_register_list_use_delete(tenant_a, adapter_root):
    r = tenant_a.post("/v1/adapters", json={"name": "beta", "source": str(adapter_root / "beta")})
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["rank"] == 16 and a["source"] == os.path.realpath(adapter_root / "beta")
    assert [x["name"] for x in tenant_a.get("/v1/adapters").json()["data"]] == ["beta"]
    again = tenant_a.post("/v1/adapters", json={"name": "beta", "source": a["source"]})
    assert again.status_code == 409
    assert (again.json()["error"]["code"], again.json()["error"]["param"]) == (
        "adapter_exists", "name")   # as docs/INTERFACES.md lists it
    assert tenant_a.delete("/v1/adapters/beta").status_code == 204
    assert tenant_a.get("/v1/adapters").json()["data"] == []
    gone = tenant_a.delete("/v1/adapters/beta")
    assert gone.status_code == 404
    assert (gone.json()["error"]["code"], gone.json()["error"]["param"]) == (
        "adapter_not_found", "name")


def test_hub_id_is_registered_with_a_revision(tenant_a):
    r = tenant_a.post("/v1/adapters", json={"name": "hub", "source": "someone/some-lora"})
    assert r.status_code == 201 and r.json()["revision"] == "main"


@pytest.fixture
def outside(tmp_path, tiny_model):
    return make_peft_adapter(tiny_model, tmp_path / "outside", r=8)


def _refusal(client, source) -> str:
    r = client.post("/v1/adapters", json={"name": "evil", "source": str(source)})
    assert r.status_code == 422, r.text
    assert client.get("/v1/adapters").json()["data"] == []
    return r.json()["error"]["message"]


def test_paths_outside_the_roots_are_refused(tenant_a, adapter_root, outside, tmp_path):
    assert "outside the allowed adapter roots" in _refusal(tenant_a, outside)
    assert "outside" in _refusal(tenant_a, f"{adapter_root}/../{outside.parent.name}/outside")
    link = adapter_root / f"link-{tmp_path.name}"
    link.symlink_to(outside)
    try:
        msg = _refusal(tenant_a, link)
        # a tenant is not told where its link leads outside the roots
        assert "outside the allowed adapter roots" in msg and str(outside) not in msg
    finally:
        link.unlink()
    assert "neither an absolute local path nor a Hub repo id" in _refusal(tenant_a, "../x")


def test_engine_rules_refuse_bad_adapters(tenant_a, adapter_root, tiny_model):
    big = make_peft_adapter(tiny_model, adapter_root / "big", r=32)
    assert "max_lora_rank=16" in _refusal(tenant_a, big)
    assert "adapter_config.json not found" in _refusal(tenant_a, adapter_root / "missing")


def test_other_tenants_cannot_see_or_delete(tenant_a, tenant_b, adapter_root):
    tenant_a.post("/v1/adapters", json={"name": "alpha", "source": str(adapter_root / "alpha")})
    assert tenant_b.get("/v1/adapters").json()["data"] == []
    assert tenant_b.delete("/v1/adapters/alpha").status_code == 404
    assert [a["name"] for a in tenant_a.get("/v1/adapters").json()["data"]] == ["alpha"]


def test_a_tenant_past_its_adapter_limit_is_refused_and_others_are_not(service, tenant_a,
                                                                        tenant_b,
                                                                        adapter_root):
    """Nothing bounded a tenant's adapters (2,227 registered in an audit, each a series of
    the opt-in per-adapter metrics)."""
    service[2].max_adapters_per_tenant = 2
    source = str(adapter_root / "alpha")
    for name in ("a1", "a2"):
        assert tenant_a.post("/v1/adapters", json={"name": name, "source": source}
                             ).status_code == 201
    r = tenant_a.post("/v1/adapters", json={"name": "a3", "source": source})
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["code"] == "adapter_quota_exceeded" and "LORRY_MAX_ADAPTERS_PER_TENANT" in \
        err["message"]
    assert sorted(a["name"] for a in tenant_a.get("/v1/adapters").json()["data"]
                  if not a["shared"]) == ["a1", "a2"]
    assert tenant_b.post("/v1/adapters", json={"name": "b1", "source": source}
                         ).status_code == 201
    assert tenant_a.delete("/v1/adapters/a1").status_code == 204
    assert tenant_a.post("/v1/adapters", json={"name": "a3", "source": source}
                         ).status_code == 201
