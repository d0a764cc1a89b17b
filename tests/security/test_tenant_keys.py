"""Operators rotate and revoke tenants' API keys with the CLI (`lorry tenant list / rotate-key /
revoke`): the old key stops working at once, the tenant's jobs stay, nothing else changes."""
from __future__ import annotations

import os
import subprocess

from procs import LORRY, run_cli

from tests.security.conftest import client


def _env(url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORRY_")}
    return {**env, "LORRY_DATABASE_URL": url}


def _key(out: str) -> str:
    return next(line.split(": ", 1)[1] for line in out.splitlines()
                if line.startswith("api key: "))


def test_rotate_then_revoke_a_key_from_the_cli(service):
    app, queue, _, url = service
    key = _key(run_cli(["tenant", "create", "acme"], _env(url)))
    with client(app, key) as c:
        job = c.post("/v1/jobs", json={"prompt": "hi", "sampling": {"max_tokens": 2}})
        assert job.status_code == 201, job.text
    new_key = _key(run_cli(["tenant", "rotate-key", "acme"], _env(url)))
    assert new_key != key
    with client(app, key) as old, client(app, new_key) as new:
        assert old.get("/v1/jobs").status_code == 401
        listed = new.get("/v1/jobs")
        assert listed.status_code == 200
        assert [j["id"] for j in listed.json()["data"]] == [job.json()["id"]]
    assert "key=active" in run_cli(["tenant", "list"], _env(url))
    assert "api key revoked" in run_cli(["tenant", "revoke", "acme"], _env(url))
    with client(app, new_key) as new:
        assert new.get("/v1/jobs").status_code == 401
    listing = run_cli(["tenant", "list"], _env(url))
    assert "acme" in listing and "key=revoked" in listing
    assert queue.get_job(job.json()["id"]) is not None  # its jobs stay
    restored = _key(run_cli(["tenant", "rotate-key", "acme"], _env(url)))
    with client(app, restored) as c:
        assert c.get("/v1/jobs").status_code == 200


def test_an_ambiguous_or_unknown_tenant_changes_nothing(service):
    app, queue, _, url = service
    first, key = queue.create_tenant("twin")
    second, _ = queue.create_tenant("twin")
    for who, says in (("twin", "2 tenants are named 'twin'"), ("nobody", "no tenant named")):
        out = subprocess.run(LORRY + ["tenant", "revoke", who], env=_env(url),
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 2 and says in out.stderr, out.stderr
    with client(app, key) as c:
        assert c.get("/v1/jobs").status_code == 200
    run_cli(["tenant", "revoke", first.id], _env(url))
    with client(app, key) as c:
        assert c.get("/v1/jobs").status_code == 401
    assert dict((t.id, ok) for t, ok in queue.list_tenants())[second.id] is True


def test_tenant_create_refuses_a_taken_or_blank_name(service):
    """The tenant commands find tenants by name, so `tenant create` refuses a name in use (and
    blank or padded names) with exit 2 and one line, creating nothing."""
    _app, queue, _, url = service
    first = _key(run_cli(["tenant", "create", "acme"], _env(url)))
    assert first.startswith("lorry_")
    before = len(queue.list_tenants())
    for name, says in (("acme", "a tenant named 'acme' exists"), ("", "is invalid"),
                       ("  ", "is invalid"), (" acme", "is invalid")):
        out = subprocess.run(LORRY + ["tenant", "create", name], env=_env(url),
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 2 and says in out.stderr, (name, out.stderr)
        assert "Traceback" not in out.stderr
    assert len(queue.list_tenants()) == before
