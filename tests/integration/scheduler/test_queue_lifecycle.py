"""Submit, claim, complete, fail/retry, release, cancel, deadlines, quota, idempotency."""
from __future__ import annotations

from datetime import timedelta

import pytest

from lorry.scheduler import JobSpec, Result, errors

RESULT = Result(text="out", token_ids=[5, 6], finish_reason="stop", prompt_tokens=3,
                completion_tokens=2, cached_tokens=1, timings={"total_s": 0.1})


@pytest.fixture
def tenant(queue):
    t, _ = queue.create_tenant("acme")
    queue.register_adapter("sql", "/adapters/sql", tenant_id=t.id, rank=8)
    return t


def claim_all(queue, worker="w1", slots=32, **kw):
    return [j for mb in queue.claim(worker, hot=[], warm=[], free_slots=slots, **kw)
            for j in mb.jobs]


def test_round_trip_keeps_result_and_stale_token_changes_nothing(queue, tenant):
    [job] = queue.submit(tenant.id, JobSpec("sql", prompt="hi", sampling={"max_tokens": 4}))
    assert job.status == "queued" and job.id.startswith("job_")
    sql = queue.get_adapter("sql", tenant.id).id
    [mb] = queue.claim("w1", hot=[sql], warm=[], free_slots=8)
    assert mb.adapter.name == "sql" and mb.adapter.id == sql > 0
    [c] = mb.jobs
    assert (c.id, c.prompt, c.sampling, c.attempts) == (job.id, "hi", {"max_tokens": 4}, 1)
    assert queue.get_job(job.id).status == "running"
    assert not queue.complete(c.id, "not-the-token", RESULT)
    assert queue.get_job(job.id).status == "running"
    assert queue.complete(c.id, c.lease_token, RESULT)
    info = queue.get_job(job.id, tenant_id=tenant.id)
    assert info.status == "succeeded" and info.result.text == "out"
    assert info.result.token_ids == [5, 6] and info.result.completion_tokens == 2
    assert (info.result.prompt_tokens, info.result.cached_tokens) == (3, 1)
    assert not queue.complete(c.id, c.lease_token, Result("other", [], "stop"))
    assert queue.get_job(job.id).result.text == "out"
    other, _ = queue.create_tenant("other")
    assert queue.get_job(job.id, tenant_id=other.id) is None


def test_expired_lease_is_reaped_and_the_old_holder_cannot_complete(queue, tenant, clock):
    [job] = queue.submit(tenant.id, JobSpec("sql", prompt="x"))
    [old] = claim_all(queue, "w1", lease_seconds=10)
    clock.advance(5)
    assert queue.reap_expired_leases() == 0
    clock.advance(6)
    assert queue.reap_expired_leases() == 1
    assert queue.get_job(job.id).status == "queued"
    [new] = claim_all(queue, "w2")
    assert new.id == job.id and new.attempts == 2 and new.lease_token != old.lease_token
    assert not queue.complete(old.id, old.lease_token, RESULT)
    assert queue.heartbeat("w1", [(old.id, old.lease_token)], [], [], 4) == {old.id}
    assert queue.complete(new.id, new.lease_token, RESULT)


def test_retry_with_backoff_then_failed_keeping_last_error(make_queue, tenant, clock):
    queue = make_queue(backoff_base_s=10, backoff_max_s=20)
    [job] = queue.submit(tenant.id, JobSpec("sql", prompt="x", max_attempts=2))
    [c] = claim_all(queue)
    assert queue.fail(c.id, c.lease_token, "CUDA OOM")
    info = queue.get_job(job.id)
    assert info.status == "queued" and info.error == "CUDA OOM"
    assert info.not_before > clock() and info.not_before <= clock() + timedelta(seconds=10)
    assert claim_all(queue) == []  # still backing off
    clock.advance(11)
    [c2] = claim_all(queue)
    assert c2.attempts == 2
    assert not queue.fail(c.id, c.lease_token, "stale")  # old lease: nothing changes
    assert queue.fail(c2.id, c2.lease_token, "CUDA OOM again")
    info = queue.get_job(job.id)
    assert (info.status, info.error, info.attempts) == ("failed", "CUDA OOM again", 2)


def test_non_retryable_failure_is_final_and_release_does_not_count(queue, tenant):
    a, b = queue.submit(tenant.id, [JobSpec("sql", prompt="a"), JobSpec("sql", prompt="b")])
    claimed = {c.id: c for c in claim_all(queue)}
    assert queue.fail(a.id, claimed[a.id].lease_token, "bad prompt", retryable=False)
    assert queue.get_job(a.id).status == "failed"
    assert queue.release(b.id, claimed[b.id].lease_token)
    assert not queue.release(b.id, claimed[b.id].lease_token)
    assert queue.get_job(b.id).attempts == 0
    [again] = claim_all(queue)
    assert again.id == b.id and again.attempts == 1


def test_cancel_queued_at_once_and_running_through_heartbeat(queue, tenant):
    a, b = queue.submit(tenant.id, [JobSpec("sql", prompt="a"), JobSpec("sql", prompt="b")])
    [c] = claim_all(queue, slots=1)
    queued = b if c.id == a.id else a
    assert queue.cancel(queued.id, tenant.id).status == "cancelled"
    assert claim_all(queue) == []
    other, _ = queue.create_tenant("other")
    assert queue.cancel(c.id, other.id) is None
    info = queue.cancel(c.id, tenant.id)
    assert info.status == "running" and info.cancel_requested
    sql = queue.get_adapter("sql", tenant.id).id
    assert queue.heartbeat("w1", [(c.id, c.lease_token)], [sql], [], 8) == {c.id}
    partial = Result("par", [1], "abort", 2, 1)
    assert queue.complete(c.id, c.lease_token, partial, cancelled=True)
    info = queue.get_job(c.id)
    assert info.status == "cancelled" and info.result.text == "par"


def test_a_job_cancelled_while_running_and_given_back_ends_cancelled(queue, tenant):
    """The worker shut down (warm) before its heartbeat learnt of the cancel and gave the job
    back: it was queued again and ran to 'succeeded'."""
    [job] = queue.submit(tenant.id, JobSpec("sql", prompt="a"))
    [c] = claim_all(queue)
    assert queue.cancel(job.id, tenant.id).status == "running"
    assert queue.release(c.id, c.lease_token)
    assert not queue.release(c.id, c.lease_token)
    info = queue.get_job(job.id)
    assert info.status == "cancelled" and info.finished_at is not None and info.result is None
    assert claim_all(queue) == []
    assert [r for r in queue.queue_depth() if r[0] in ("queued", "running")] == []
    [other] = queue.submit(tenant.id, JobSpec("sql", prompt="b"))  # the group still serves
    assert [j.id for j in claim_all(queue)] == [other.id]


def test_deadlines_expire_queued_and_running_jobs(queue, tenant, clock):
    soon = clock() + timedelta(seconds=30)
    a, b = queue.submit(tenant.id, [JobSpec("sql", prompt="a", deadline=soon),
                                    JobSpec("sql", prompt="b", deadline=soon)])
    [c] = claim_all(queue, slots=1)
    assert queue.heartbeat("w1", [(c.id, c.lease_token)], [], [], 1) == set()
    clock.advance(31)
    assert queue.expire_deadlines() == 2
    assert {queue.get_job(j.id).status for j in (a, b)} == {"expired"}
    assert claim_all(queue) == []
    assert queue.heartbeat("w1", [(c.id, c.lease_token)], [], [], 1) == {c.id}
    assert not queue.complete(c.id, c.lease_token, RESULT)


def test_idempotency_key_returns_the_existing_job(queue, tenant):
    [first] = queue.submit(tenant.id, JobSpec("sql", prompt="a", idempotency_key="k1"))
    [again, new] = queue.submit(tenant.id, [JobSpec("sql", prompt="changed", idempotency_key="k1"),
                                            JobSpec("sql", prompt="b", idempotency_key="k2")])
    assert again.id == first.id and again.prompt == "a" and new.id != first.id
    other, _ = queue.create_tenant("other")
    [theirs] = queue.submit(other.id, JobSpec(None, prompt="a", idempotency_key="k1"))
    assert theirs.id != first.id
    assert len(queue.list_jobs(tenant.id)) == 2


def test_quota_refuses_the_whole_submit_and_frees_up_after_claims(queue):
    t, _ = queue.create_tenant("small", max_queued=3)
    queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(3)])
    with pytest.raises(errors.QuotaExceeded, match="max_queued quota of 3"):
        queue.submit(t.id, [JobSpec(None, prompt="x"), JobSpec(None, prompt="y")])
    assert len(queue.list_jobs(t.id)) == 3
    assert len(claim_all(queue, slots=2)) == 2
    assert len(queue.submit(t.id, [JobSpec(None, prompt="x"), JobSpec(None, prompt="y")])) == 2


def test_bad_input_is_refused_with_nothing_queued(queue, tenant):
    with pytest.raises(errors.UnknownAdapter, match="nope"):
        queue.submit(tenant.id, [JobSpec("sql", prompt="a"), JobSpec("nope", prompt="b")])
    with pytest.raises(errors.InvalidJob, match="exactly one of prompt or messages"):
        queue.submit(tenant.id, JobSpec("sql"))
    with pytest.raises(errors.InvalidJob, match="max_attempts"):
        queue.submit(tenant.id, JobSpec("sql", prompt="a", max_attempts=0))
    assert queue.list_jobs(tenant.id) == []
    other, _ = queue.create_tenant("other")
    with pytest.raises(errors.UnknownAdapter):  # another tenant's adapter is not visible
        queue.submit(other.id, JobSpec("sql", prompt="a"))


def test_tenants_adapters_and_listing(queue, tenant):
    t2, key = queue.create_tenant("beta", weight=2.0)
    assert queue.authenticate(key).id == t2.id
    assert queue.authenticate(key[:-1] + "x") is None and queue.authenticate("junk") is None
    shared = queue.register_adapter("sql", "hub/sql", revision="main")
    with pytest.raises(errors.AdapterExists):
        queue.register_adapter("sql", "/again", tenant_id=tenant.id)
    assert queue.get_adapter("sql", tenant.id).tenant_id == tenant.id  # own wins
    assert queue.get_adapter("sql", t2.id).id == shared.id
    jobs = queue.submit(tenant.id, [JobSpec("sql", prompt=str(i)) for i in range(5)])
    page1 = queue.list_jobs(tenant.id, limit=3)
    page2 = queue.list_jobs(tenant.id, limit=3, after=page1[-1].id)
    assert [j.id for j in page1 + page2] == [j.id for j in jobs]
    depth = {(s, a, t): n for s, a, t, n in queue.queue_depth()}
    assert depth[("queued", "sql", tenant.id)] == 5
    assert queue.delete_adapter("sql", tenant.id)
    # Its queued jobs fail when claimed, naming the deleted adapter.
    assert claim_all(queue) == []
    assert "deleted" in queue.get_job(jobs[0].id).error


def test_one_claim_fails_every_queued_job_of_a_deleted_adapter_and_reaches_the_rest(queue,
                                                                                  tenant):
    """A claim that leased only a deleted adapter's jobs answered [] ("queue empty"): the
    drain ended with thousands such jobs and others still queued, and they failed ~14 a
    second, one claim per nudge (a bulk audit). One claim now goes on past them."""
    queue.register_adapter("gone", "/adapters/gone", tenant_id=tenant.id)
    doomed = queue.submit(tenant.id, [JobSpec("gone", prompt=f"p{i}") for i in range(40)])
    queue.delete_adapter("gone", tenant.id)
    assert queue.claim("w", [], [], free_slots=4) == []          # one claim: all 40 fail
    assert {queue.get_job(j.id).status for j in doomed} == {"failed"}
    # behind more of them, a claim still answers with the job that can run
    queue.register_adapter("gone2", "/adapters/gone2", tenant_id=tenant.id)
    doomed = queue.submit(tenant.id, [JobSpec("gone2", prompt=f"p{i}") for i in range(40)])
    queue.delete_adapter("gone2", tenant.id)
    later = queue.submit(tenant.id, [JobSpec(None, prompt="after")])
    got = [j.id for mb in queue.claim("w", [], [], free_slots=4) for j in mb.jobs]
    assert got == [later[0].id]


def test_bulk_submit_keeps_every_field_byte_for_byte(queue, tenant):
    # Large enough for PostgreSQL's COPY path; the text has every character COPY escapes.
    odd = "tab\there\nnew line\\backslash \\N é 🚚 \r end"
    msgs = [{"role": "user", "content": odd}]
    specs = [JobSpec("sql", prompt=odd if i % 2 else None, messages=None if i % 2 else msgs,
                     sampling={"max_tokens": i, "stop": ["\n", "\\t"]}, priority=i % 3,
                     custom_id=f"c{i}") for i in range(150)]
    jobs = queue.submit(tenant.id, specs)
    for spec, job in zip(specs, jobs):
        got = queue.get_job(job.id)
        assert (got.prompt, got.messages, got.sampling, got.priority, got.custom_id) == (
            spec.prompt, spec.messages, spec.sampling, spec.priority, spec.custom_id)
    claimed = [j for mb in queue.claim("w", [], [], free_slots=200) for j in mb.jobs]
    assert len(claimed) == 150


def test_complete_many_records_each_result_once_fenced_by_its_own_lease(queue, tenant, clock):
    jobs = queue.submit(tenant.id, [JobSpec("sql", prompt=f"p{i}") for i in range(5)])
    claimed = claim_all(queue, "w1", lease_seconds=10)
    assert len(claimed) == 5
    clock.advance(11)
    queue.reap_expired_leases()
    [retaken, *_] = claim_all(queue, "w2", slots=1)  # w1 lost this one's lease to w2
    results = {c.id: Result(text=f"out {c.id}", token_ids=[1, i], finish_reason="length",
                            prompt_tokens=2 + i, completion_tokens=2, cached_tokens=i,
                            timings={"run_s": 0.5})
               for i, c in enumerate(claimed)}
    old = [c for c in claimed if c.id != retaken.id]
    # w1 re-claims the four others (reaped too), then records the five it thinks it holds
    fresh = {c.id: c for c in claim_all(queue, "w1")}
    items = [(c.id, fresh[c.id].lease_token, results[c.id], False) for c in old]
    items.append((retaken.id, next(c for c in claimed if c.id == retaken.id).lease_token,
                  results[retaken.id], False))
    items[0] = (items[0][0], items[0][1], items[0][2], True)  # stopped on a cancel request
    written = queue.complete_many(items)
    assert written == {c.id for c in old}
    for job in jobs:
        info = queue.get_job(job.id)
        if job.id == retaken.id:
            assert info.status == "running" and info.result is None  # w2's lease is intact
            continue
        assert info.result.text == f"out {job.id}" and info.result.token_ids == \
            results[job.id].token_ids and info.result.finish_reason == "length"
        assert (info.result.prompt_tokens, info.result.cached_tokens) == \
            (results[job.id].prompt_tokens, results[job.id].cached_tokens)
        assert info.status == ("cancelled" if job.id == items[0][0] else "succeeded")
    assert queue.complete_many(items) == set()  # written once: a second write changes nothing
    assert queue.complete(retaken.id, retaken.lease_token, RESULT)
