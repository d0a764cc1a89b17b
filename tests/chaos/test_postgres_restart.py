"""PostgreSQL restarted mid-run (a private cluster, stopped with -m immediate: every
connection drops): the worker, beat and API reconnect and the run completes, nothing lost."""
from __future__ import annotations

import json
import time

import httpx
from chaos_harness import Services, audit, batch_lines, service_env, status_counts
from procs import wait_until

from tests.chaos.conftest import ADAPTERS


def test_postgres_restarted_mid_run(tiny, private_pg, redis_server):
    root, model, adapter_root = tiny
    url = private_pg.url
    env = service_env(url, redis_server.url, model, adapter_root, root)
    services = Services(env, root / "logs-pg", workers=1)
    try:
        from lorry.scheduler import JobQueue

        q = JobQueue(url)
        tenant, key = q.create_tenant("pg-chaos")
        for name in ADAPTERS:
            q.register_adapter(name, str(adapter_root / name), tenant_id=tenant.id, rank=4)
        q.close()
        auth = {"Authorization": f"Bearer {key}"}
        n = 96     # 96 jobs of 96 tokens: the drain runs for seconds (see test_faults.TOKENS)
        body = "".join(json.dumps(x) + "\n"
                       for x in batch_lines(n, ADAPTERS + ["base"], 96, "pg")).encode()
        r = httpx.post(f"{services.api}/v1/batches", content=body, headers=auth, timeout=60)
        assert r.status_code == 201, r.text
        batch = r.json()["id"]
        wait_until(lambda: status_counts(url).get("running"), 120, "running jobs",
                   services.procs)
        private_pg.stop("immediate")
        # while it is down the API says so (503), it does not hang or crash
        ready = httpx.get(f"{services.api}/readyz", timeout=30)
        assert ready.status_code == 503 and "database" in ready.json()
        time.sleep(3)
        private_pg.start()
        wait_until(lambda: httpx.get(f"{services.api}/readyz", timeout=10).status_code == 200,
                   60, "the API to reconnect", services.procs)
        wait_until(lambda: status_counts(url).get("succeeded", 0) == n, 240,
                   "every job to succeed after the restart", services.procs)
        facts = audit(url)
        assert facts["rows"] == n and facts["duplicate_custom_ids"] == 0
        assert facts["succeeded_without_result"] == 0
        out = httpx.get(f"{services.api}/v1/batches/{batch}/output", headers=auth, timeout=60)
        ids = [json.loads(x)["custom_id"] for x in out.text.splitlines() if x]
        assert len(ids) == n == len(set(ids))
        assert all(p.alive() for p in services.procs), services.logs_tail()
    finally:
        services.stop()
