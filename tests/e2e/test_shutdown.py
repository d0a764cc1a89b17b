"""Warm shutdown (SIGTERM) of a Celery GPU worker mid-drain: it releases what it holds; and
a worker whose engine fails stops (exit status 70) after giving its jobs back."""
from __future__ import annotations

import os
import signal
import sys

import procs
import redis
from procs import Proc, wait_until

from lorry.client import Client
from tests.e2e.conftest import create_tenant

N_JOBS = 48


def test_sigterm_mid_drain_releases_jobs_and_a_new_worker_finishes_them(stack, tmp_path):
    for p in stack["procs"]:
        if p.name == "worker":
            p.stop()  # this test brings its own worker
    env = {**stack["env"], "LORRY_WORKER_ID": "e2e-shutdown-worker"}
    with Client(stack["api"], create_tenant(stack, "shutdown")) as c:
        # enough work that the drain runs for seconds (4 rows at a time): 6 jobs of the tiny
        # model took 0.6 s, over before a poll could see one running
        jobs = [c.submit(f"long {i}", max_tokens=110, temperature=0, ignore_eos=True)
                for i in range(N_JOBS)]
        worker = Proc("worker-sigterm", ["worker", "--name", "e2e-sigterm@%h"], env, tmp_path)
        try:
            wait_until(lambda: any(c.get(j.id).status == "running" for j in jobs), 120,
                       "a running job", [worker])
            stats_key = f"{env['LORRY_REDIS_PREFIX']}:stats:e2e-shutdown-worker"
            assert redis.Redis.from_url(env["LORRY_BROKER_URL"]).exists(stats_key)
            os.killpg(os.getpgid(worker.popen.pid), signal.SIGTERM)
            assert worker.popen.wait(60) == 0, worker.tail()
            # a clean stop takes its /metrics series with it (not an hour later, by TTL)
            assert not redis.Redis.from_url(env["LORRY_BROKER_URL"]).exists(stats_key)
            statuses = [c.get(j.id).status for j in jobs]
            assert "running" not in statuses and set(statuses) <= {"queued", "succeeded"}
            # the drain saw the shutdown (unless everything was already done)
            assert "'reason': 'shutdown'" in worker.tail(20000) or \
                statuses == ["succeeded"] * N_JOBS
        finally:
            worker.stop()
        again = Proc("worker-again", ["worker", "--name", "e2e-again@%h"], env, tmp_path)
        try:
            done = [c.wait(j.id, timeout=180) for j in jobs]
        finally:
            again.stop()
        assert [d.status for d in done] == ["succeeded"] * N_JOBS
        assert all(len(d.result.token_ids) == 110 for d in done)


# `lorry` with an engine whose step raises while a prompt holds the marker (as a CUDA error
# out of a step would); everything else is the real worker
BROKEN_ENGINE = """
import lorry.engine.llm_engine as m
step = m.LLMEngine.step
def broken(self):
    if any("BREAK-THE-ENGINE" in (s.prompt or "") for s in self._seqs.values()):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return step(self)
m.LLMEngine.step = broken
from lorry.cli import app; app()
"""


def test_a_worker_whose_engine_fails_gives_its_jobs_back_and_exits(stack, tmp_path,
                                                                    monkeypatch):
    for p in stack["procs"]:
        if p.name == "worker":
            p.stop()  # this test brings its own workers
    env = {**stack["env"], "LORRY_WORKER_ID": "e2e-broken-worker"}
    with Client(stack["api"], create_tenant(stack, "broken")) as c:
        poison = c.submit("BREAK-THE-ENGINE please", max_tokens=8, temperature=0)
        others = [c.submit(f"fine {i}", max_tokens=8, temperature=0) for i in range(3)]
        monkeypatch.setattr(procs, "LORRY", [sys.executable, "-c", BROKEN_ENGINE])
        broken = Proc("worker-broken", ["worker", "--name", "e2e-broken@%h"], env, tmp_path)
        try:
            # it stops by itself once the failed drain's task has ended, taking no more
            assert broken.popen.wait(180) == 70, broken.tail()
        finally:
            broken.stop()
        log = broken.tail(50000)
        assert "this worker stops after the task" in log and "RuntimeError" in log
        job = c.get(poison.id)
        assert (job.status, job.attempts) == ("queued", 1), job
        assert "RuntimeError" in job.error and "illegal memory" not in job.error
        monkeypatch.setattr(procs, "LORRY", [sys.executable, "-c",
                                             "from lorry.cli import app; app()"])
        fresh = Proc("worker-fresh", ["worker", "--name", "e2e-fresh@%h"], env, tmp_path)
        try:
            done = [c.wait(j.id, timeout=180) for j in [poison, *others]]
        finally:
            fresh.stop()
    assert [d.status for d in done] == ["succeeded"] * 4
    assert done[0].attempts == 2
