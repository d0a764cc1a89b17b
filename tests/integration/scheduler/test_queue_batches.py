"""OpenAI-Batch-shaped batches: counts, finalization, cancel, expiry, ordered results."""
from __future__ import annotations

import json

import pytest

from lorry.scheduler import JobSpec, Result, errors
from lorry.scheduler.batches import RESULTS_PAGE


@pytest.fixture
def tenant(queue):
    t, _ = queue.create_tenant("acme")
    queue.register_adapter("sql", "/adapters/sql")
    return t


def specs(n: int) -> list[JobSpec]:
    return [JobSpec("sql", prompt=f"p{i}", custom_id=f"req-{n - i}") for i in range(n)]


def test_batch_completes_with_counts_and_results_in_input_order(queue, tenant):
    batch = queue.create_batch(tenant.id, specs(3), metadata={"run": "nightly"})
    assert batch.status == "in_progress" and batch.request_counts == {
        "total": 3, "completed": 0, "failed": 0}
    assert batch.expires_at is not None and batch.metadata == {"run": "nightly"}
    jobs = [j for mb in queue.claim("w", [], [], free_slots=8) for j in mb.jobs]
    for j in jobs[:2]:
        assert queue.complete(j.id, j.lease_token, Result("ok", [1], "stop"))
    assert queue.finalize_batches() == 0  # one job still running
    assert queue.fail(jobs[2].id, jobs[2].lease_token, "boom", retryable=False)
    assert queue.finalize_batches() == 1
    done = queue.get_batch(batch.id, tenant.id)
    assert done.status == "completed" and done.completed_at is not None
    assert done.request_counts == {"total": 3, "completed": 2, "failed": 1}
    assert [j.custom_id for j in queue.batch_results(batch.id, tenant.id)] == [
        "req-3", "req-2", "req-1"]
    other, _ = queue.create_tenant("other")
    assert queue.get_batch(batch.id, other.id) is None


@pytest.mark.parametrize("n", [2 * RESULTS_PAGE, 2 * RESULTS_PAGE + 37])
def test_results_and_output_file_cross_pages_whole_and_in_order(queue, tenant, n):
    """Results are read RESULTS_PAGE jobs at a time (a logprobs-heavy page of 1,000 took a
    worker to 1.4 GB): every job comes once, in input order, at and past page edges."""
    batch = queue.create_batch(tenant.id, specs(n))
    while jobs := [j for mb in queue.claim("w", [], [], free_slots=64) for j in mb.jobs]:
        queue.complete_many([(j.id, j.lease_token, Result(f"out-{j.id}", [1], "stop"), False)
                             for j in jobs])
    assert queue.finalize_batches() == 1
    want = [s.custom_id for s in specs(n)]
    assert [j.custom_id for j in queue.batch_results(batch.id, tenant.id)] == want
    done = queue.get_batch(batch.id, tenant.id)
    body = b"".join(queue.file_content(done.output_file_id, tenant.id))
    lines = [json.loads(x) for x in body.splitlines()]
    assert [x["custom_id"] for x in lines] == want


def test_cancel_batch_goes_through_cancelling_to_cancelled(queue, tenant):
    batch = queue.create_batch(tenant.id, specs(4))
    [running] = [j for mb in queue.claim("w", [], [], free_slots=1) for j in mb.jobs]
    info = queue.cancel_batch(batch.id, tenant.id)
    assert info.status == "cancelling" and info.cancelling_at is not None
    assert queue.finalize_batches() == 0
    assert queue.heartbeat("w", [(running.id, running.lease_token)], [], [], 1) == {running.id}
    queue.complete(running.id, running.lease_token, Result("part", [], "abort"), cancelled=True)
    assert queue.finalize_batches() == 1
    final = queue.get_batch(batch.id, tenant.id)
    assert final.status == "cancelled" and final.request_counts["failed"] == 4


def test_a_cancelled_batch_whose_worker_shut_down_runs_nothing_more(queue, tenant):
    """A warm shutdown gives back the running jobs before the worker's heartbeat learns of
    the cancel: they went back to the queue, ran after all, and the batch ended 'cancelled'
    with every request completed."""
    batch = queue.create_batch(tenant.id, specs(3))
    running = [j for mb in queue.claim("w", [], [], free_slots=2) for j in mb.jobs]
    assert queue.cancel_batch(batch.id, tenant.id).status == "cancelling"
    for j in running:
        assert queue.release(j.id, j.lease_token)
    assert [j for mb in queue.claim("w2", [], [], free_slots=8) for j in mb.jobs] == []
    assert queue.finalize_batches() == 1
    final = queue.get_batch(batch.id, tenant.id)
    assert final.status == "cancelled"
    assert final.request_counts == {"total": 3, "completed": 0, "failed": 3}
    assert {r.status for r in queue.batch_results(batch.id, tenant.id)} == {"cancelled"}
    assert [r for r in queue.queue_depth() if r[0] == "queued"] == []


def test_batch_expires_after_its_completion_window(queue, tenant, clock):
    batch = queue.create_batch(tenant.id, specs(2), completion_window="1h")
    clock.advance(3601)
    assert queue.expire_deadlines() == 2
    assert queue.finalize_batches() == 1
    assert queue.get_batch(batch.id, tenant.id).status == "expired"


def test_bad_batches_are_refused_with_nothing_queued(queue, tenant):
    dup = [JobSpec("sql", prompt="a", custom_id="same"), JobSpec("sql", prompt="b",
                                                                  custom_id="same")]
    with pytest.raises(errors.InvalidJob, match="duplicate custom_id 'same'"):
        queue.create_batch(tenant.id, dup)
    with pytest.raises(errors.InvalidJob, match="completion_window"):
        queue.create_batch(tenant.id, specs(1), completion_window="tomorrow")
    with pytest.raises(errors.UnknownAdapter):
        queue.create_batch(tenant.id, [JobSpec("nope", prompt="x", custom_id="1")])
    assert queue.list_jobs(tenant.id) == []


def test_a_cancel_waiting_behind_the_finalizer_leaves_the_finished_batch_alone(queue, tenant):
    """PostgreSQL: the finalizer commits "completed" while a cancel that read "in_progress"
    waits for the batch row. The cancel answers the completed batch and changes nothing
    (it reopened it as "cancelling" and the next pass made it "cancelled" with a second pair
    of files)."""
    if queue.connector.dialect != "postgresql":
        pytest.skip("SQLite serializes the cancel and the finalizer (one writer)")
    import threading

    from sqlalchemy import create_engine, text

    batch = queue.create_batch(tenant.id, specs(2))
    for j in [j for mb in queue.claim("w", [], [], free_slots=8) for j in mb.jobs]:
        assert queue.complete(j.id, j.lease_token, Result("ok", [1], "stop"))
    outcome: dict = {}
    side = create_engine(queue.engine.url)  # the queue's own pool may be one connection
    with side.connect() as finalizer:
        # the finalizer's transaction holds the batch row (as _finalize does while it
        # builds the files)
        finalizer.execute(text("SELECT id FROM batches WHERE id = :b FOR UPDATE"),
                          {"b": batch.id})
        cancel = threading.Thread(target=lambda: outcome.setdefault(
            "info", queue.cancel_batch(batch.id, tenant.id)))
        cancel.start()
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND wait_event_type = 'Lock'")
        with side.connect() as probe:
            for _ in range(500):
                if probe.execute(text(waiting)).scalar_one():
                    break
                threading.Event().wait(0.01)
            else:
                raise AssertionError("the cancel never waited for the batch row")
        finalizer.execute(text(
            "UPDATE batches SET status = 'completed', completed_at = now(), completed = 2, "
            "failed = 0 WHERE id = :b"), {"b": batch.id})
        finalizer.commit()
        cancel.join(30)
    side.dispose()
    assert outcome["info"].status == "completed"
    assert queue.finalize_batches() == 0
    final = queue.get_batch(batch.id, tenant.id)
    assert final.status == "completed" and final.cancelling_at is None
    assert final.request_counts == {"total": 2, "completed": 2, "failed": 0}


def test_upkeep_takes_one_turn_per_interval_across_processes(make_queue, tenant, clock):
    """Draining workers call upkeep(due_after_s=maintain interval): one of them (or beat)
    expires deadlines and finalizes batches per interval, the others skip."""
    worker_a, worker_b = make_queue(), make_queue()
    batch = worker_a.create_batch(tenant.id, specs(1), completion_window="1h")
    assert worker_a.upkeep(due_after_s=15) == {"expired": 0, "batches_finalized": 0,
                                               "files_expired": 0}
    clock.advance(3601)  # the window ends
    assert worker_b.upkeep(due_after_s=3600 + 2) is None  # worker_a's turn: 3601 s ago
    assert worker_b.upkeep(due_after_s=15) == {"expired": 1, "batches_finalized": 1,
                                               "files_expired": 0}
    assert worker_a.upkeep(due_after_s=15) is None
    assert worker_a.upkeep() == {"expired": 0, "batches_finalized": 0,  # beat: always
                                 "files_expired": 0}
    assert worker_a.get_batch(batch.id, tenant.id).status == "expired"
