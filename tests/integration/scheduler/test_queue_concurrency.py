"""Concurrent claimers (threads and processes) never share a job; a killed claimer's jobs
come back through the reaper."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from datetime import datetime, timedelta, timezone

from claim_procs import claim_then_hang, drain, drain_process

from lorry.scheduler import JobSpec, errors


def _seed(queue, n: int) -> set[str]:
    tenants = [queue.create_tenant(f"t{i}")[0] for i in range(3)]
    for a in range(4):
        queue.register_adapter(f"a{a}", f"/adapters/a{a}")
    ids = set()
    for i, t in enumerate(tenants):
        jobs = queue.submit(t.id, [JobSpec(f"a{k % 4}" if k % 5 else None, prompt=str(k))
                                   for k in range(i, n, 3)])
        ids |= {j.id for j in jobs}
    return ids


def test_threads_never_claim_the_same_job(make_queue, db_url):
    queue = make_queue(clock=None)
    ids = _seed(queue, 300)
    out: list = []
    lock = threading.Lock()
    threads = [threading.Thread(target=drain, args=(db_url, f"w{i}", out, lock))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == len(set(out)) == 300
    assert set(out) == ids


def test_processes_never_claim_the_same_job(make_queue, db_url):
    queue = make_queue(clock=None)
    ids = _seed(queue, 300)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(3):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=drain_process, args=(db_url, f"p{i}", send))
        p.start()
        pipes.append(recv)
        procs.append(p)
    got = [x for r in pipes for x in r.recv()]
    for p in procs:
        p.join(timeout=60)
    assert len(got) == len(set(got)) == 300
    assert set(got) == ids


def test_killed_claimers_jobs_come_back_after_the_lease(make_queue, db_url):
    real = make_queue(clock=None)
    t, _ = real.create_tenant("t")
    real.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(8)])
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=claim_then_hang, args=(db_url, send))
    proc.start()
    held = set(recv.recv())
    assert len(held) == 5
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert real.reap_expired_leases() == 0  # leases still valid: nothing taken away
    later = datetime.now(timezone.utc) + timedelta(seconds=61)
    reaper = make_queue(clock=lambda: later)
    assert reaper.reap_expired_leases() == 5
    back = {j.id for mb in reaper.claim("survivor", [], [], free_slots=32) for j in mb.jobs}
    assert held <= back and len(back) == 8
    assert all(reaper.get_job(i).attempts == 2 for i in held)


def test_a_submit_beside_an_open_batch_never_queues_past_the_quota(queue):
    """A tenant's batch holds 60 of its 100 queued jobs in an open transaction while a submit
    of 60 more runs: one of the two is refused, never both queued. (The submit does not wait
    for the ingest: the batch takes the quota lock only to finish.)"""
    tenant, _ = queue.create_tenant("small", max_queued=100)
    holding, release = threading.Event(), threading.Event()

    def chunks():
        yield [JobSpec(None, prompt=f"b{i}", custom_id=f"b{i}") for i in range(60)], []
        holding.set()
        release.wait(10)

    outcome: dict = {}

    def run(name, call, *args):
        try:
            outcome[name] = call(*args)
        except Exception as e:  # noqa: BLE001 - the test reads what it was
            outcome[name] = e

    batch = threading.Thread(target=run, args=("batch", queue.ingest_batch, tenant.id,
                                                chunks()))
    batch.start()
    assert holding.wait(10)
    submitter = threading.Thread(target=run, args=(
        "submit", queue.submit, tenant.id, [JobSpec(None, prompt=f"s{i}") for i in range(60)]))
    submitter.start()
    submitter.join(0.5 if queue.connector.dialect == "sqlite" else 10)
    release.set()
    batch.join(30)
    submitter.join(30)
    refused = [k for k, v in outcome.items() if isinstance(v, errors.QuotaExceeded)]
    assert len(refused) == 1, outcome
    assert (outcome[refused[0]].queued, outcome[refused[0]].requested) == (60, 60)
    assert len(queue.list_jobs(tenant.id, limit=1000)) == 60


def test_concurrent_submits_never_queue_past_the_quota(make_queue):
    queue = make_queue(clock=None)
    tenant, _ = queue.create_tenant("small", max_queued=5)
    start = threading.Barrier(12)
    results: list = []

    def submit(i):
        start.wait()
        try:
            results.append(queue.submit(tenant.id, JobSpec(None, prompt=str(i))))
        except errors.QuotaExceeded as e:
            results.append(e)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 12
    assert sum(isinstance(r, errors.QuotaExceeded) for r in results) == 7
    assert len(queue.list_jobs(tenant.id)) == 5
