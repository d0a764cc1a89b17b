"""The drain's database side runs beside the engine: results recorded many per transaction,
the engine decoding on while the database is away, nothing lost or recorded twice."""
from __future__ import annotations

import threading
import time

import pytest

from lorry.scheduler import JobSpec, errors
from lorry.workers.drain import Drainer


def short_jobs(queue, n, max_tokens=2):
    tenant, _ = queue.create_tenant("t")
    return queue.submit(tenant.id, [JobSpec(adapter=("alpha", None)[i % 2], prompt=f"p{i}",
                                            sampling={"max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True})
                                    for i in range(n)])


def test_results_are_recorded_many_per_transaction(queue, engine, monkeypatch):
    jobs = short_jobs(queue, 24)
    real_many, sizes = queue.complete_many, []
    monkeypatch.setattr(queue, "complete", None)  # every result goes through complete_many
    monkeypatch.setattr(queue, "complete_many", lambda items: sizes.append(len(items)) or
                        real_many(items))
    summary = Drainer(queue, engine, "w", max_num_seqs=4, heartbeat_seconds=5).run()
    assert summary.succeeded == 24 and sum(sizes) == 24
    assert max(sizes) > 1 and len(sizes) < 24
    assert {queue.get_job(j.id).status for j in jobs} == {"succeeded"}


@pytest.mark.parametrize("error", [errors.Unavailable, errors.ConnectionLost, errors.Retryable])
def test_the_engine_decodes_on_while_the_database_is_away(queue, engine, monkeypatch, error):
    """The queue's typed errors for "try again" (database away, connection lost, transaction
    aborted on a conflict): results wait and are written once the database answers again."""
    jobs = short_jobs(queue, 12, max_tokens=4)
    away = threading.Event()
    steps_while_away = []
    real = {name: getattr(queue, name)
            for name in ("complete_many", "complete", "fail", "heartbeat", "claim")}

    def outage(name):
        def call(*args, **kw):
            if away.is_set():
                raise error()
            return real[name](*args, **kw)
        return call

    for name in real:
        monkeypatch.setattr(queue, name, outage(name))
    real_step = engine.step

    def step():
        if away.is_set():
            steps_while_away.append(1)
        out = real_step()
        if out and not steps_while_away and not away.is_set():
            away.set()  # the database goes away once the first requests finish ...
            threading.Timer(0.5, away.clear).start()  # ... and is back half a second later
        time.sleep(0.002)
        return out

    monkeypatch.setattr(engine, "step", step)
    summary = Drainer(queue, engine, "w", max_num_seqs=4, heartbeat_seconds=0.05,
                      claim_ahead=8).run()
    assert steps_while_away, "the engine stopped while the database was away"
    assert summary.succeeded == 12 and summary.failed == 0
    infos = [queue.get_job(j.id) for j in jobs]
    assert [i.status for i in infos] == ["succeeded"] * 12
    assert all(i.attempts == 1 and len(i.result.token_ids) == 4 for i in infos)


def test_results_wait_for_the_database_within_a_bound(queue, engine, monkeypatch):
    # With room for 2 waiting results, the engine holds the third until one is written.
    short_jobs(queue, 8)
    gate = threading.Event()
    real_many = queue.complete_many

    def slow_many(items):
        gate.wait()
        return real_many(items)

    monkeypatch.setattr(queue, "complete_many", slow_many)
    drainer = Drainer(queue, engine, "w", max_num_seqs=2, max_pending_results=2,
                      heartbeat_seconds=5, claim_ahead=0)
    done = []
    runner = threading.Thread(target=lambda: done.append(drainer.run()))
    runner.start()
    time.sleep(1.0)
    assert runner.is_alive() and not done  # blocked: results cannot be written
    # the bound: 2 waiting for the writer, plus the batch of at most 2 it is writing
    assert len(drainer._writer.pending_jobs()) <= 2 * 2
    gate.set()
    runner.join(60)
    assert done and done[0].succeeded == 8


def test_the_claimer_never_holds_more_than_its_capacity_while_jobs_are_handed_over():
    """take() woke the claimer before the engine had the jobs in its rows: the claimer saw
    their rows as free and claimed them again (up to 9 held for a capacity of 5; 7-8 jobs
    'running' on a worker of max_num_seqs 4)."""
    from types import SimpleNamespace as NS

    from lorry.workers.pipeline import Claimer

    held: list = []
    count = [0]
    peak = [0]
    lock = threading.Lock()

    def claim(n):
        with lock:
            count[0] += n
            peak[0] = max(peak[0], len(held) + len(claimer.buffered()) + n + in_hand[0])
        return [NS(adapter=None, jobs=[NS(id=f"j{count[0]}-{k}") for k in range(n)])]

    in_hand = [0]
    claimer = Claimer(claim, capacity=5, engine_rows=lambda: len(held), min_claim=1)
    claimer.start()
    try:
        for _ in range(15):
            taken = claimer.take(4 - len(held))
            in_hand[0] = len(taken)
            for c in taken:   # the engine adds them one by one (tokenizing: a few ms each)
                time.sleep(0.004)
                held.append(c)
                in_hand[0] -= 1
            claimer.landed(len(taken))
            time.sleep(0.03)
            held.clear()   # they all finish
    finally:
        claimer.stop()
    assert count[0] > 15 and peak[0] <= 5, peak[0]
