"""Who can read the figures: /metrics needs the operator's token (off without one) and names
no tenant or adapter unless opted in; Flower refuses to start open and guards every page."""
from __future__ import annotations

import os
import subprocess

import httpx
import pytest
from pydantic import SecretStr

from tests.security.conftest import client

TOKEN = "scrape-token-1"


@pytest.fixture
def metrics_app(service):
    """make(**settings) -> an app over the service's queue with those settings."""
    from lorry.api.app import create_app

    _, queue, settings, _ = service

    def make(**update):
        return create_app(settings.model_copy(update=update), queue=queue, nudger=None,
                          redis_client=None)
    return make


def _busy_tenant(alice, roots) -> str:
    """Alice registers adapter 'secret-project' and queues a job on it; returns her id."""
    r = alice.post("/v1/adapters", json={"name": "secret-project",
                                         "source": str(roots[0] / "good")})
    assert r.status_code == 201, r.text
    assert alice.post("/v1/jobs", json={"prompt": "x", "adapter": "secret-project"}
                      ).status_code == 201
    return alice.tenant.id


def test_metrics_are_off_without_a_configured_token(service, alice):
    r = alice.get("/metrics")  # even with a tenant's valid API key
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "metrics_disabled"
    assert "LORRY_METRICS_TOKEN" in r.json()["error"]["message"]


def test_metrics_need_the_token_and_name_no_tenant(service, alice, roots, metrics_app):
    tenant_id = _busy_tenant(alice, roots)
    app = metrics_app(metrics_token=SecretStr(TOKEN))
    for key in (None, "wrong", alice.key):
        r = client(app, key).get("/metrics")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
        assert r.json()["error"]["type"] == "authentication_error"
    r = client(app, TOKEN).get("/metrics")
    assert r.status_code == 200
    assert 'lorry_jobs{status="queued"} 1.0' in r.text
    assert tenant_id not in r.text and "secret-project" not in r.text and "tenant=" not in r.text


def test_tenant_labels_when_the_operator_opts_in(service, alice, roots, metrics_app):
    tenant_id = _busy_tenant(alice, roots)
    app = metrics_app(metrics_token=SecretStr(TOKEN), metrics_tenant_labels=True)
    text = client(app, TOKEN).get("/metrics").text
    assert (f'lorry_jobs{{adapter="secret-project",status="queued",tenant="{tenant_id}"}} 1.0'
            in text)


def test_one_series_per_label_set_with_tenant_labels(service, alice, roots, metrics_app):
    """A tenant's own adapter named like a shared one gave two samples of one series (and a
    deleted adapter's queued jobs collided with base-model jobs): Prometheus keeps one of
    them, undercounting the queue. They are summed."""
    _app, queue, *_ = service
    queue.register_adapter("twin", str(roots[0] / "good"), rank=8)             # shared
    for tenant_id in (None, alice.tenant.id):
        if tenant_id is not None:
            assert alice.post("/v1/adapters", json={"name": "twin", "source": str(
                roots[0] / "good")}).status_code == 201
        assert alice.post("/v1/jobs", json={"prompt": "x", "adapter": "twin"}
                          ).status_code == 201
    app = metrics_app(metrics_token=SecretStr(TOKEN), metrics_tenant_labels=True)
    lines = [x for x in client(app, TOKEN).get("/metrics").text.splitlines()
             if x.startswith("lorry_jobs{")]
    series = [x.rsplit(" ", 1)[0] for x in lines]
    assert len(series) == len(set(series)), lines
    assert (f'lorry_jobs{{adapter="twin",status="queued",tenant="{alice.tenant.id}"}} 2.0'
            in lines), lines


def test_metrics_settings_from_the_environment(monkeypatch, tmp_path):
    from lorry.settings import Settings

    monkeypatch.setenv("LORRY_METRICS_TOKEN", "from-env")
    monkeypatch.setenv("LORRY_METRICS_TENANT_LABELS", "true")
    s = Settings(data_dir=tmp_path)
    assert s.metrics_token.get_secret_value() == "from-env" and s.metrics_tenant_labels
    assert "from-env" not in repr(s)
    monkeypatch.setenv("LORRY_METRICS_TOKEN", "")
    assert Settings(data_dir=tmp_path).metrics_token is None


def _flower_env(tmp_path, redis_url: str, auth: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORRY_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH")}
    env.update(LORRY_BROKER_URL=redis_url, LORRY_DATA_DIR=str(tmp_path))
    if auth is not None:
        env["LORRY_FLOWER_BASIC_AUTH"] = auth
    return env


@pytest.mark.parametrize("auth", [None, "", "no-colon", ":nopassword"])
def test_flower_refuses_to_start_without_credentials(tmp_path, auth):
    from procs import LORRY, free_port

    env = _flower_env(tmp_path, "redis://127.0.0.1:1/0", auth)
    out = subprocess.run(LORRY + ["flower", "--port", str(free_port())], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "LORRY_FLOWER_BASIC_AUTH" in out.stderr


def test_flower_insecure_runs_open_with_a_warning(tmp_path):
    from chaos_harness import RedisServer
    from procs import Proc, free_port, wait_until

    redis = RedisServer()
    port = free_port()
    flower = Proc("flower-open", ["flower", "--port", str(port), "--insecure"],
                  _flower_env(tmp_path, redis.url, None), tmp_path)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck",
                                     timeout=5).status_code == 200, 60, "Flower", [flower])
        assert "WITHOUT authentication" in flower.tail()
    finally:
        flower.stop()
        redis.kill()
