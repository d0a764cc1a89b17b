"""Faults under a running drain (real api, beat and Celery GPU workers on PostgreSQL and a
private Redis): kill -9 of a worker, warm shutdown, Redis restarted empty. Every job ends
with exactly one result and no row is duplicated."""
from __future__ import annotations

import json
import signal

import httpx
import pytest
from chaos_harness import Services, audit, batch_lines, service_env, wait_drained
from procs import wait_until
from sqlalchemy import create_engine, text

from tests.chaos.conftest import ADAPTERS


@pytest.fixture(scope="module")
def stack(tiny, database_url, redis_server):
    root, model, adapter_root = tiny
    env = service_env(database_url, redis_server.url, model, adapter_root, root)
    services = Services(env, root / "logs-faults", workers=2)
    from lorry.scheduler import JobQueue

    q = JobQueue(database_url)
    tenant, key = q.create_tenant("chaos")
    for name in ADAPTERS:
        q.register_adapter(name, str(adapter_root / name), tenant_id=tenant.id, rank=4)
    q.close()
    yield services, key, database_url
    services.stop()


# Long enough jobs, and enough of them, that a drain runs for seconds: the tiny model decodes
# 16 rows of 24 tokens in ~0.1 s, so short batches could finish between two polls that look
# for running jobs (seen in CI as "timed out waiting for ... running jobs").
TOKENS = 96
N = 96


def submit(services, key, n, prefix, max_tokens=TOKENS):
    lines = batch_lines(n, ADAPTERS + ["base"], max_tokens, prefix)
    body = "".join(json.dumps(x) + "\n" for x in lines).encode()
    r = httpx.post(f"{services.api}/v1/batches", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def running_by_worker(url) -> dict[str, list[str]]:
    eng = create_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT worker_id, id FROM jobs WHERE status = 'running'")).all()
    eng.dispose()
    out: dict[str, list[str]] = {}
    for worker, job in rows:
        out.setdefault(worker, []).append(job)
    return out


def batch_rows(url, batch_id):
    eng = create_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT id, status, worker_id, attempts, completion_tokens "
                                 "FROM jobs WHERE batch_id = :b"), {"b": batch_id}).all()
    eng.dispose()
    return {r.id: r for r in rows}


def final_total(url):
    return audit(url)["rows"]


def assert_exactly_once(url, services, key, batch_id, n, max_tokens=TOKENS):
    rows = batch_rows(url, batch_id)
    assert len(rows) == n
    assert all(r.status == "succeeded" and r.completion_tokens == max_tokens
               for r in rows.values()), {r.status for r in rows.values()}
    facts = audit(url)
    assert facts["duplicate_custom_ids"] == 0 and facts["succeeded_without_result"] == 0
    assert facts["distinct_ids"] == facts["rows"]
    with httpx.stream("GET", f"{services.api}/v1/batches/{batch_id}/output", timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        ids = [json.loads(x)["custom_id"] for x in r.iter_lines() if x.strip()]
    assert len(ids) == n == len(set(ids))
    return rows


def victim_holding_jobs(services, url):
    """Wait until a worker holds running jobs; return (its Proc, the job ids it holds)."""
    names = {f"chaos-{p.name}": p for p in services.workers}
    held = wait_until(lambda: {w: j for w, j in running_by_worker(url).items() if w in names},
                      120, "a worker holding running jobs", services.procs)
    worker_id, jobs = max(held.items(), key=lambda kv: len(kv[1]))
    return names[worker_id], worker_id, set(jobs)


def test_kill9_mid_drain_jobs_return_after_the_lease_and_finish_elsewhere(stack):
    services, key, url = stack
    n = N
    batch = submit(services, key, n, "kill")
    victim, victim_id, held = victim_holding_jobs(services, url)
    services.kill(victim, signal.SIGKILL)
    services.add_worker()  # a second worker is still up; this keeps two for the next tests
    wait_drained(url, final_total(url), 240, services)
    rows = assert_exactly_once(url, services, key, batch, n)
    # the killed worker's jobs were re-run (attempt 2) and finished by another worker
    assert all(rows[j].worker_id != victim_id and rows[j].attempts >= 2 for j in held)


def test_sigterm_finishes_or_releases_within_the_bound(stack):
    services, key, url = stack
    n = N
    batch = submit(services, key, n, "term")
    victim, victim_id, _ = victim_holding_jobs(services, url)
    services.kill(victim, signal.SIGTERM)
    assert victim.popen.wait(30) == 0, victim.tail()  # the bound: 30 s, warm (exit code 0)
    # nothing is left running under its name: each job was finished or released to the queue
    assert victim_id not in running_by_worker(url)
    services.workers.remove(victim)
    services.procs.remove(victim)
    services.add_worker()
    wait_drained(url, final_total(url), 240, services)
    assert_exactly_once(url, services, key, batch, n)


def test_redis_restarted_empty_mid_run(stack, redis_server):
    services, key, url = stack
    n = N
    batch = submit(services, key, n, "redis")
    wait_until(lambda: running_by_worker(url), 120, "the drain to start", services.procs)
    redis_server.restart_empty(down_seconds=2)  # queued Celery messages and nudge keys lost
    # the API still takes work (its nudge fails soft, beat re-nudges from the table)
    batch2 = submit(services, key, 10, "after-redis")
    wait_drained(url, final_total(url), 240, services)
    assert_exactly_once(url, services, key, batch, n)
    assert_exactly_once(url, services, key, batch2, 10)
    assert all(p.alive() for p in services.procs), services.logs_tail()


def test_idle_workers_drain_the_table_while_redis_is_away(stack, redis_server):
    """Redis goes before the work comes: no nudge and no beat message can reach the idle
    workers, yet they find the jobs in the table themselves (LORRY_BROKER_FALLBACK_SECONDS)
    and run each once; when Redis is back, Celery's drains take over again."""
    services, key, url = stack
    wait_drained(url, final_total(url), 240, services)        # every worker idle
    redis_server.kill()
    try:
        batch = submit(services, key, 24, "no-redis", max_tokens=16)
        wait_drained(url, final_total(url), 120, services)
        assert_exactly_once(url, services, key, batch, 24, max_tokens=16)
    finally:
        redis_server.start()
    batch2 = submit(services, key, 8, "redis-back", max_tokens=16)
    wait_drained(url, final_total(url), 120, services)
    assert_exactly_once(url, services, key, batch2, 8, max_tokens=16)
    assert all(p.alive() for p in services.procs), services.logs_tail()
    def logs():
        return "".join(p.log.read_text(errors="replace") for p in services.workers)
    assert "drains them itself" in logs()
    wait_until(lambda: "reachable again" in logs(), 30, "the workers to see Redis back",
               services.procs)
