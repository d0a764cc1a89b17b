"""The drain loop: continuous batching from the queue, results equal to the engine alone."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from lorry.scheduler import JobSpec
from lorry.scheduler.types import is_adapter_failure
from lorry.workers.drain import Drainer


def drainer(queue, engine, **kw):
    return Drainer(queue, engine, "w-test", max_num_seqs=4, lease_seconds=30,
                   heartbeat_seconds=kw.pop("heartbeat_seconds", 5.0), **kw)


def alone(engine, queue, adapter, prompt, max_tokens):
    """What the engine gives for this request by itself."""
    from lorry.engine import LoRARequest, SamplingParams

    lora = None
    if adapter:
        info = queue.get_adapter(adapter, None)
        lora = LoRARequest(adapter, info.id, info.source)
    [out] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0),
                            lora_request=[lora], use_tqdm=False)
    return out.outputs[0].token_ids


def test_mixed_jobs_all_succeed_and_equal_the_engine_alone(queue, engine, tiny):
    tenant, _ = queue.create_tenant("t")
    specs = [JobSpec(adapter=a, prompt=f"prompt {i} for {a}", sampling={
        "max_tokens": 3 + i % 4, "temperature": 0}) for i in range(3) for a in
        (None, "alpha", "beta")]
    specs.append(JobSpec(adapter="alpha", messages=[{"role": "user", "content": "chat"}],
                         sampling={"max_tokens": 5, "temperature": 0}))
    jobs = queue.submit(tenant.id, specs)
    summary = drainer(queue, engine).run()
    assert summary.reason == "queue empty" and summary.succeeded == len(specs)
    for job, spec in zip(jobs, specs):
        info = queue.get_job(job.id)
        assert info.status == "succeeded", info.error
        prompt = spec.messages if spec.messages else spec.prompt
        want = alone(engine, queue, spec.adapter, prompt, spec.sampling["max_tokens"])
        assert info.result.token_ids == want, (spec, info.result)
    assert not engine.has_unfinished_requests()


def test_tokens_per_second_is_the_last_drain_that_generated(queue, engine):
    """The worker's tokens/s gauge keeps the last drain with work: the empty drains a worker
    runs between nudges do not reset it to 0."""
    tenant, _ = queue.create_tenant("t")
    queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"p{i}", sampling={
        "max_tokens": 4, "temperature": 0, "ignore_eos": True}) for i in range(3)])
    d = drainer(queue, engine)
    busy = d.run()
    assert busy.tokens == 12 and d.stats.tokens_per_second == busy.tokens / busy.seconds
    idle = d.run()
    assert idle.tokens == 0 and d.stats.tokens_per_second == busy.tokens / busy.seconds


def test_bad_adapter_and_too_long_prompt_fail_their_jobs_only(queue, engine, tmp_path):
    tenant, _ = queue.create_tenant("t")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA",
                                                            "use_dora": True,
                                                            "lora_bias": True}))
    queue.register_adapter("broken", str(broken), rank=8)
    jobs = queue.submit(tenant.id, [
        JobSpec(adapter="broken", prompt="a", sampling={"max_tokens": 2}),
        JobSpec(adapter=None, prompt="b" * 300, sampling={"max_tokens": 2}),
        JobSpec(adapter="alpha", prompt="c", sampling={"max_tokens": 2, "temperature": 0})])
    summary = drainer(queue, engine).run()
    assert (summary.failed, summary.succeeded) == (2, 1)
    bad_adapter, too_long, good = (queue.get_job(j.id) for j in jobs)
    assert bad_adapter.status == "failed" and "DoRA" in bad_adapter.error
    # the error the API answers as 422 adapter_unloadable, naming the adapter once
    assert is_adapter_failure(bad_adapter.error) and not is_adapter_failure(too_long.error)
    assert bad_adapter.error.count("cannot be loaded") == 1, bad_adapter.error
    assert bad_adapter.attempts <= 1
    assert too_long.status == "failed" and "max_model_len" in too_long.error
    assert good.status == "succeeded"


def test_cancel_of_a_running_job_keeps_partial_output(queue, engine, monkeypatch):
    tenant, _ = queue.create_tenant("t")
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.005) or real_step())  # GPU-like
    long, short = queue.submit(tenant.id, [
        JobSpec(adapter=None, prompt="long", sampling={"max_tokens": 60, "temperature": 0,
                                                       "ignore_eos": True}),
        JobSpec(adapter=None, prompt="short", sampling={"max_tokens": 1, "temperature": 0})])

    def cancel_long(job, status):
        if job.id == short.id:  # the long job is running now: ask for its cancellation
            assert queue.cancel(long.id, tenant.id) is not None

    summary = drainer(queue, engine, heartbeat_seconds=0.0, on_result=cancel_long).run()
    info = queue.get_job(long.id)
    assert info.status == "cancelled" and summary.cancelled == 1
    assert info.result is not None and 0 < len(info.result.token_ids) < 60
    assert info.result.finish_reason == "abort"


def test_a_cancel_reaches_the_running_job_between_heartbeats(queue, engine, monkeypatch):
    """The worker learnt of a cancel only at its heartbeat (10 s by default): a job cancelled
    just after it started ran on to its end and 'succeeded'. The cancel poll stops it within
    cancel_poll_seconds, and no heartbeat (lease write) is spent on it."""
    tenant, _ = queue.create_tenant("t")
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or real_step())
    long, short = queue.submit(tenant.id, [
        JobSpec(adapter=None, prompt="long", sampling={"max_tokens": 300, "temperature": 0,
                                                       "ignore_eos": True}),
        JobSpec(adapter=None, prompt="short", sampling={"max_tokens": 1, "temperature": 0})])
    beats, beats_by_then = [], []

    def cancel_long(job, status):
        if job.id == short.id:
            assert queue.cancel(long.id, tenant.id).status == "running"
        else:
            beats_by_then.append(len(beats))

    d = drainer(queue, engine, heartbeat_seconds=60.0, cancel_poll_seconds=0.05,
                on_result=cancel_long)
    real_beat = queue.heartbeat
    monkeypatch.setattr(queue, "heartbeat", lambda *a, **kw: beats.append(1) or
                        real_beat(*a, **kw))
    summary = d.run()
    info = queue.get_job(long.id)
    assert info.status == "cancelled" and summary.cancelled == 1
    assert 0 < len(info.result.token_ids) < 300 and info.result.finish_reason == "abort"
    assert beats_by_then == [0]  # no heartbeat before it ended (one follows the drain)


def test_a_cancel_reaches_a_claimed_job_still_waiting_in_the_buffer(queue, engine,
                                                                    monkeypatch):
    """The cancel poll looked only at the jobs in the engine: a claimed job waiting in the
    worker's buffer learnt of its cancel at the next heartbeat (~9 s of 10)."""
    import threading

    tenant, _ = queue.create_tenant("t")
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or real_step())
    jobs = queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"p{i}", sampling={
        "max_tokens": 150, "ignore_eos": True}) for i in range(6)])
    d = drainer(queue, engine, heartbeat_seconds=60.0, cancel_poll_seconds=0.05,
                claim_ahead=2)
    done = threading.Thread(target=d.run)
    done.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (d._claimer and d._claimer.buffered()
                                                   and len(d.held) == 4):
            time.sleep(0.01)
        [waiting, *_] = d._claimer.buffered()
        asked = time.monotonic()
        assert queue.cancel(waiting.job.id, tenant.id).status == "running"
        while queue.get_job(waiting.job.id).status == "running" and \
                time.monotonic() - asked < 5:
            time.sleep(0.01)
        info = queue.get_job(waiting.job.id)
        assert info.status == "cancelled" and time.monotonic() - asked < 1.5
        assert "cancelled before it ran" in (info.error or "")
        assert any(queue.get_job(j.id).status == "running" for j in jobs)  # others run on
    finally:
        done.join()
    assert sorted(queue.get_job(j.id).status for j in jobs) == ["cancelled"] + [
        "succeeded"] * 5


def test_a_warm_shutdown_ends_a_job_whose_cancel_it_had_not_learnt(queue, engine,
                                                                    monkeypatch):
    """Given back at a warm shutdown before the worker learnt of its cancel, the job went
    back to the queue and the next worker ran it to 'succeeded'."""
    tenant, _ = queue.create_tenant("t")
    [job] = queue.submit(tenant.id, [JobSpec(adapter=None, prompt="p", sampling={
        "max_tokens": 50, "ignore_eos": True})])
    real_step, steps = engine.step, []

    def step():
        steps.append(1)
        if len(steps) == 2:
            assert queue.cancel(job.id, tenant.id).status == "running"
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    ended = []
    d = drainer(queue, engine, heartbeat_seconds=60.0, cancel_poll_seconds=60.0,
                on_result=lambda job, status: ended.append((job.id, status)))
    summary = d.run(should_stop=lambda: len(steps) > 3)
    assert summary.reason == "shutdown" and (summary.cancelled, summary.released) == (1, 0)
    info = queue.get_job(job.id)
    assert info.status == "cancelled" and info.result.finish_reason == "abort"
    assert 0 < len(info.result.token_ids) < 50   # the tokens it had, as a cancel keeps them
    assert ended == [(job.id, "cancelled")] and d.stats.jobs["cancelled"] == 1
    monkeypatch.undo()
    assert drainer(queue, engine).run().succeeded == 0
    assert queue.get_job(job.id).status == "cancelled"


def test_warm_shutdown_releases_what_it_holds(queue, engine, monkeypatch):
    tenant, _ = queue.create_tenant("t")
    jobs = queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"p{i}", sampling={
        "max_tokens": 50, "ignore_eos": True}) for i in range(3)])
    real_step, steps = engine.step, []

    def counted_step():
        steps.append(1)
        return real_step()

    monkeypatch.setattr(engine, "step", counted_step)
    summary = drainer(queue, engine).run(should_stop=lambda: len(steps) > 3)
    assert summary.reason == "shutdown" and summary.released == 3
    assert [queue.get_job(j.id).status for j in jobs] == ["queued"] * 3
    assert not engine.has_unfinished_requests()
    monkeypatch.undo()
    assert drainer(queue, engine).run().succeeded == 3


def test_a_result_the_database_refuses_fails_only_that_job(queue, engine, monkeypatch):
    tenant, _ = queue.create_tenant("t")
    bad, good = queue.submit(tenant.id, [JobSpec(adapter=None, prompt=p, sampling={
        "max_tokens": 2, "temperature": 0}) for p in ("bad", "good")])
    real_complete, real_many = queue.complete, queue.complete_many

    def complete(job_id, *args, **kw):
        if job_id == bad.id:
            raise ValueError("value refused by the database")
        return real_complete(job_id, *args, **kw)

    def complete_many(items):  # the batch holding the bad one is refused as a whole
        if any(item[0] == bad.id for item in items):
            raise ValueError("value refused by the database")
        return real_many(items)

    monkeypatch.setattr(queue, "complete", complete)
    monkeypatch.setattr(queue, "complete_many", complete_many)
    summary = drainer(queue, engine).run()
    assert (summary.failed, summary.succeeded) == (1, 1)
    info = queue.get_job(bad.id)
    assert info.status == "failed" and "value refused by the database" in info.error
    assert queue.get_job(good.id).status == "succeeded"


def test_an_engine_crash_gives_the_jobs_back_at_once(queue, engine, monkeypatch):
    tenant, _ = queue.create_tenant("t")
    jobs = queue.submit(tenant.id, [JobSpec(adapter="alpha", prompt=f"p{i}", sampling={
        "max_tokens": 3}) for i in range(2)])

    def broken_step():
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(engine, "step", broken_step)
    with pytest.raises(RuntimeError, match="device-side assert"):
        drainer(queue, engine).run()
    assert [queue.get_job(j.id).status for j in jobs] == ["queued", "queued"]
    assert not engine.has_unfinished_requests()


def test_a_job_that_breaks_every_step_fails_after_max_attempts(queue, engine, monkeypatch):
    """An engine error counts an attempt of the jobs in the engine, as a killed worker's
    expired lease does: a job that breaks each step it is in fails at max_attempts instead of
    taking its micro-batch down at every drain (it was released uncounted, forever). Its
    error names the type only: the text may name another tenant's adapter."""
    tenant, _ = queue.create_tenant("t")
    [job] = queue.submit(tenant.id, [JobSpec(adapter="alpha", prompt="p", max_attempts=2,
                                             sampling={"max_tokens": 3})])
    monkeypatch.setattr(queue, "backoff_base_s", 0.0)

    def broken_step():
        raise RuntimeError("CUDA error in /adapters/tenant_other/secret")

    monkeypatch.setattr(engine, "step", broken_step)
    for attempt in (1, 2):
        with pytest.raises(RuntimeError):
            drainer(queue, engine).run()
        info = queue.get_job(job.id)
        assert info.attempts == attempt and "RuntimeError" in info.error
        assert "secret" not in info.error
    assert info.status == "failed"
    assert drainer(queue, engine).run().reason == "queue empty"
    assert not engine.has_unfinished_requests()


def test_an_engine_error_that_spends_the_last_attempt_counts_a_failed_job(queue, engine,
                                                                         monkeypatch):
    """The retry after an engine error ends the job at max_attempts: the worker counts it
    failed (not given back) and on_result hears of its end; a job with attempts left is
    counted given back and on_result hears nothing."""
    tenant, _ = queue.create_tenant("t")
    [last] = queue.submit(tenant.id, [JobSpec(adapter=None, prompt="p", max_attempts=1,
                                              sampling={"max_tokens": 3})])
    [more] = queue.submit(tenant.id, [JobSpec(adapter=None, prompt="q", max_attempts=3,
                                              sampling={"max_tokens": 3})])

    def broken_step():
        raise RuntimeError("CUDA error")

    monkeypatch.setattr(engine, "step", broken_step)
    ends = []
    d = drainer(queue, engine, on_result=lambda job, status: ends.append((job.id, status)))
    with pytest.raises(RuntimeError):
        d.run()
    assert queue.get_job(last.id).status == "failed"
    assert queue.get_job(more.id).status == "queued"
    assert ends == [(last.id, "failed")]
    assert (d.summary.failed, d.summary.released) == (1, 1)
    assert d.stats.jobs["failed"] == 1


def test_an_overflowing_adapter_fails_its_job_and_its_micro_batch_runs_on(queue, engine,
                                                                          tiny, tmp_path):
    """A tenant's adapter with finite weights whose products overflow float32 (NaN logits):
    its sampled job fails with the reason and the other tenant's jobs beside it in the engine
    succeed. (The NaN reached ``multinomial``, whose error ended every drain that claimed the
    job: the other jobs were released and claimed with it again, without end.)"""
    from safetensors.torch import load_file, save_file

    loud = tmp_path / "loud"
    shutil.copytree(tiny[1]["alpha"], loud)
    weights = loud / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(str(weights)).items()}, str(weights))
    attacker, _ = queue.create_tenant("attacker")
    victim, _ = queue.create_tenant("victim")
    queue.register_adapter("loud", str(loud), tenant_id=attacker.id, rank=8)
    [bad] = queue.submit(attacker.id, [JobSpec(adapter="loud", prompt="x", sampling={
        "max_tokens": 8, "temperature": 1.0})])
    good = queue.submit(victim.id, [JobSpec(adapter=a, prompt=f"v{i}", sampling={
        "max_tokens": 6, "temperature": 0}) for i, a in enumerate(("alpha", None, "beta"))])
    summary = drainer(queue, engine).run()
    assert summary.reason == "queue empty" and (summary.succeeded, summary.failed) == (3, 1)
    info = queue.get_job(bad.id)
    assert info.status == "failed" and info.attempts == 1
    assert "adapter 'loud' produced NaN or infinite logits" in info.error
    for job, a in zip(good, ("alpha", None, "beta")):
        done = queue.get_job(job.id)
        assert done.status == "succeeded"
        assert done.result.token_ids == alone(engine, queue, a, done.prompt, 6)


def test_time_limit_finishes_held_jobs_and_claims_no_more(queue, engine, monkeypatch):
    tenant, _ = queue.create_tenant("t")
    jobs = queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"p{i}", sampling={
        "max_tokens": 6, "ignore_eos": True}) for i in range(6)])
    real_step, steps = engine.step, []

    def first_step_is_slow():  # the limit passes while the engine holds 4 jobs
        if not steps:
            time.sleep(0.3)
        steps.append(1)
        return real_step()

    monkeypatch.setattr(engine, "step", first_step_is_slow)
    summary = drainer(queue, engine).run(max_seconds=0.1)
    statuses = [queue.get_job(j.id).status for j in jobs]
    assert summary.reason == "time limit" and summary.succeeded == 4
    assert statuses == ["succeeded"] * 4 + ["queued"] * 2  # engine rows: max_num_seqs=4
    # each of the two was claimed ahead of the engine's rows and given back, or never
    # claimed (the claimer keeps max_num_seqs + claim_ahead out, claiming from one job up,
    # so 0, 1 or 2 of them, as the claim thread and the engine's steps happen to interleave)
    assert summary.released <= 2
    assert queue.get_job(jobs[4].id).attempts == 0


def test_a_busy_drain_finalizes_batches_and_expires_deadlines_itself(queue, engine, tiny,
                                                                     monkeypatch):
    """Beat's maintain runs on a worker between drains, so while every worker drains (a
    steady load) no batch was finalized and no deadline expired for up to
    LORRY_DRAIN_MAX_SECONDS (22 s of 20 in a live run; 120 s by default): the Celery
    worker's drain takes maintain's turn for those, once per maintain interval."""
    from datetime import datetime, timedelta, timezone

    from lorry.settings import Settings
    from lorry.workers.runtime import build_drainer

    tenant, _ = queue.create_tenant("t")
    batch = queue.create_batch(tenant.id, [JobSpec(adapter=None, prompt=f"b{i}", custom_id=str(i),
                                                   sampling={"max_tokens": 1}) for i in range(2)])
    late = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"long {i}", priority=-10, sampling={
        "max_tokens": 60, "ignore_eos": True}) for i in range(16)])   # keeps the drain busy
    [doomed] = queue.submit(tenant.id, [JobSpec(adapter=None, prompt="d", deadline=late,
                                                sampling={"max_tokens": 1}, priority=-20)])
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.01), real_step())[1])
    settings = Settings(database_url=str(queue.engine.url), model=str(tiny[0]),
                        maintain_interval=0.1, heartbeat_seconds=0.1, max_num_seqs=4)
    d = build_drainer(settings, queue=queue, engine=engine, publish=False)
    give_up = time.monotonic() + 60

    def done() -> bool:
        return (queue.get_batch(batch.id, None).status == "completed"
                and queue.get_job(doomed.id).status == "expired") or time.monotonic() > give_up

    summary = d.run(should_stop=done)
    assert summary.reason == "shutdown" and summary.released  # it was still draining
    final = queue.get_batch(batch.id, None)
    assert final.status == "completed" and final.output_file_id is not None
    assert queue.get_job(doomed.id).status == "expired"
    assert queue.upkeep(due_after_s=3600) is None  # the drain recorded its turn


def test_the_drain_that_runs_a_batchs_last_jobs_finalizes_it(queue, engine, tiny):
    """With a worker and no beat (the README's processes, beat left out), a batch whose
    jobs had all finished stayed in_progress for good: the drain ended (queue empty) before
    its upkeep's turn, and only beat's maintain finalized batches after that."""
    from lorry.settings import Settings
    from lorry.workers.runtime import build_drainer

    tenant, _ = queue.create_tenant("t")
    settings = Settings(database_url=str(queue.engine.url), model=str(tiny[0]),
                        maintain_interval=3600, max_num_seqs=4)
    queue.upkeep()      # a pass was just taken: none is due within the drain
    passes = []
    real_upkeep = queue.upkeep
    queue.upkeep = lambda *a, **kw: (passes.append(kw), real_upkeep(*a, **kw))[1]
    drainer = build_drainer(settings, queue=queue, engine=engine, publish=False)
    assert drainer.run().reason == "queue empty" and passes == []   # ended nothing: no pass
    batch = queue.create_batch(tenant.id, [JobSpec(adapter=None, prompt=f"b{i}", custom_id=str(i),
                                                   sampling={"max_tokens": 1}) for i in range(3)])
    summary = drainer.run()
    assert summary.reason == "queue empty" and summary.succeeded == 3
    final = queue.get_batch(batch.id, None)
    assert final.status == "completed" and final.request_counts["completed"] == 3
    assert final.output_file_id is not None
    assert passes == [{}]                       # one pass, at the end, due or not


def test_results_count_the_prompt_tokens_the_prefix_cache_served(queue, engine):
    """Jobs whose prompts share a long head with a job of the same adapter that ran before
    report the head's full KV blocks as cached: in their results, their batch's output lines
    and the Batch's usage; another adapter's job on the same head reports none."""
    tenant, _ = queue.create_tenant("t")
    head = "Answer in one short sentence, politely, and name no source: "
    sampling = {"max_tokens": 2, "temperature": 0}
    [first] = queue.submit(tenant.id, [JobSpec(adapter="alpha", prompt=head + "Q0",
                                               sampling=sampling)])
    assert drainer(queue, engine).run().succeeded == 1
    specs = [JobSpec(adapter=a, prompt=head + f"Q{i}", custom_id=str(i), sampling=sampling)
             for i, a in ((1, "alpha"), (2, "alpha"), (3, "beta"))]
    batch = queue.create_batch(tenant.id, specs)
    assert drainer(queue, engine).run().succeeded == 3
    # the whole blocks of what the prompts share: the head and "Q"
    ids = [engine.tokenizer.encode_prompt(head + f"Q{i}")[1] for i in (0, 1)]
    shared = next(n for n, (a, b) in enumerate(zip(*ids)) if a != b)
    bs = engine.cache_stats()["kv"]["block_size"]
    cached = shared // bs * bs
    assert cached >= 2 * bs
    assert queue.get_job(first.id).result.cached_tokens == 0
    jobs = {j.custom_id: j.result for j in queue.batch_results(batch.id, None)}
    assert {c: r.cached_tokens for c, r in jobs.items()} == {"1": cached, "2": cached, "3": 0}
    assert all(r.prompt_tokens == len(ids[1]) for r in jobs.values())
    assert queue.finalize_batches() == 1
    final = queue.get_batch(batch.id, None)
    lines = [json.loads(x) for x in b"".join(queue.file_content(final.output_file_id, None))
             .decode().splitlines()]
    assert {x["custom_id"]: x["response"]["body"]["usage"]["prompt_tokens_details"]
            for x in lines} == {"1": {"cached_tokens": cached}, "2": {"cached_tokens": cached},
                                "3": {"cached_tokens": 0}}
    assert (final.input_tokens, final.cached_tokens) == (3 * len(ids[1]), 2 * cached)


@pytest.mark.parametrize("late_beat", [0.0, 1.5])
def test_a_job_reclaimed_after_a_database_outage_runs_on_and_succeeds(queue, engine,
                                                                      monkeypatch, late_beat):
    """An outage longer than the lease: the worker's heartbeats failed, its running job's
    lease ran out, and when the database came back the worker's own next claim requeued the
    job and leased it to the same worker again, whose engine refused the id as in use; the
    drain took that ValueError for a bad request and failed the job for good (an audit with
    a real PostgreSQL stopped for 25 s and for 65 s). ``late_beat``: the first heartbeat
    after the outage, sent with the old lease, answers after the job was claimed back: its
    "lease lost" stopped the job under its new lease (ended cancelled; a review)."""
    import lorry.scheduler.claims as claims

    tenant, _ = queue.create_tenant("t")
    [job] = queue.submit(tenant.id, [JobSpec(adapter=None, prompt="long", sampling={
        "max_tokens": 100, "ignore_eos": True, "temperature": 0}, max_attempts=20)])
    expected = alone(engine, queue, None, "long", 100)
    monkeypatch.setattr(claims, "RESCUE_EVERY_S", 0.0)   # every claim requeues expired leases
    real_heartbeat, away_until = queue.heartbeat, time.monotonic() + 2.5

    late = [late_beat]

    def heartbeat(*a, **kw):                             # the database is away for 2.5 s
        if time.monotonic() < away_until:
            raise ConnectionError("the database is away")
        if late and late[0]:
            time.sleep(late.pop())                       # its leases are the old ones
        return real_heartbeat(*a, **kw)

    monkeypatch.setattr(queue, "heartbeat", heartbeat)
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.3), real_step())[1])  # ~4 s
    d = Drainer(queue, engine, "w-test", max_num_seqs=4, lease_seconds=1.0,
                heartbeat_seconds=0.2)
    summary = d.run()
    done = queue.get_job(job.id)
    assert done.status == "succeeded", done.error
    assert done.result.token_ids == expected
    assert summary.succeeded == 1 and summary.failed == 0


def test_a_chat_template_that_raises_fails_only_its_job(queue, engine, monkeypatch):
    """add_request raised the template's own error (jinja2's TemplateError, not a ValueError):
    the drain stopped, its co-running jobs were charged an attempt and the bad job stayed
    leased, to do it again after its lease."""
    tenant, _ = queue.create_tenant("t")
    real_add = engine.add_request

    class TemplateError(Exception):
        pass

    def add_request(request_id, prompt, *a, **kw):
        if isinstance(prompt, list) and prompt[0]["role"] == "assistant":
            raise TemplateError("Conversation roles must alternate user/assistant")
        return real_add(request_id, prompt, *a, **kw)

    monkeypatch.setattr(engine, "add_request", add_request)
    good, bad, after = queue.submit(tenant.id, [
        JobSpec(adapter=None, prompt="a", sampling={"max_tokens": 3}),
        JobSpec(adapter=None, messages=[{"role": "assistant", "content": "x"}],
                sampling={"max_tokens": 3}, max_attempts=1),
        JobSpec(adapter=None, prompt="b", sampling={"max_tokens": 3})])
    summary = drainer(queue, engine).run()
    assert summary.reason == "queue empty" and summary.succeeded == 2
    info = queue.get_job(bad.id)
    assert info.status == "failed" and "TemplateError" in info.error
    assert [queue.get_job(j.id).attempts for j in (good, after)] == [1, 1]


@pytest.fixture
def holding_engine(tiny):
    """A CPU engine that holds prompts as a CUDA one does by default (prefill_min_tokens)."""
    from lorry.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny[0]), device="cpu", max_loras=2,
                                  max_lora_rank=16, max_cpu_loras=4, max_num_seqs=4,
                                  max_model_len=128, prefill_min_tokens=40,
                                  prefill_max_wait=6))


def test_an_engine_error_gives_the_backlog_back_without_spending_an_attempt(
        queue, holding_engine, monkeypatch):
    """The jobs waiting in the engine beyond its rows never ran: when a step breaks, those in
    its rows spend an attempt, the backlog is given back as if still buffered."""
    tenant, _ = queue.create_tenant("t")
    jobs = queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"p{i}", sampling={
        "max_tokens": 3}) for i in range(8)])
    real_step, seen = holding_engine.step, []

    def step():
        if seen:
            raise RuntimeError("CUDA error: device-side assert triggered")
        seen.append(holding_engine.num_unfinished_requests())
        return real_step()

    monkeypatch.setattr(holding_engine, "step", step)
    with pytest.raises(RuntimeError):
        drainer(queue, holding_engine).run()
    assert seen == [5]                                   # 4 rows and a backlog of 1
    infos = [queue.get_job(j.id) for j in jobs]
    assert [i.status for i in infos] == ["queued"] * 8
    assert sorted(i.attempts for i in infos) == [0] * 4 + [1] * 4   # the rows' only
    assert not holding_engine.has_unfinished_requests()


def test_past_the_time_limit_the_backlog_is_given_back_unstarted(queue, holding_engine,
                                                                monkeypatch):
    tenant, _ = queue.create_tenant("t")
    jobs = queue.submit(tenant.id, [JobSpec(adapter=None, prompt=f"p{i}", sampling={
        "max_tokens": 6, "ignore_eos": True}) for i in range(8)])
    real_step, steps = holding_engine.step, []

    def first_step_is_slow():  # the limit passes while the engine holds 4 rows + 1 waiting
        if not steps:
            time.sleep(0.3)
        steps.append(holding_engine.num_unfinished_requests())
        return real_step()

    monkeypatch.setattr(holding_engine, "step", first_step_is_slow)
    summary = drainer(queue, holding_engine).run(max_seconds=0.1)
    assert steps[0] == 5 and summary.reason == "time limit" and summary.succeeded == 4
    infos = [queue.get_job(j.id) for j in jobs]
    assert sorted(i.status for i in infos) == ["queued"] * 4 + ["succeeded"] * 4
    assert all(i.attempts == 0 for i in infos if i.status == "queued")
    assert not holding_engine.has_unfinished_requests()


def test_an_engine_that_holds_prompts_gets_a_backlog_and_every_job_runs(queue, engine,
                                                                      holding_engine):
    """An engine holding new prompts for larger prompt steps (prefill_min_tokens, CUDA's
    default) holds only while more wait than its free rows take: the drain puts up to
    engine_backlog jobs beyond its rows into it, and the results equal the engine alone."""
    holding = holding_engine
    tenant, _ = queue.create_tenant("t")
    specs = [JobSpec(adapter=(None, "alpha", "beta")[i % 3], prompt=f"job {i} " * (1 + i % 3),
                     sampling={"max_tokens": 2 + (5 * i) % 9, "temperature": 0})
             for i in range(14)]
    jobs = queue.submit(tenant.id, specs)
    d = drainer(queue, holding)
    assert d.engine_backlog == d.claim_ahead == 1          # max_num_seqs 4 // 8, at least 1
    assert drainer(queue, engine).engine_backlog == 0      # a CPU engine's default: no hold
    most = []
    real_step = holding.step

    def step():
        most.append(holding.num_unfinished_requests())
        return real_step()

    holding.step = step
    summary = d.run()
    assert summary.succeeded == len(specs)
    assert max(most) == 4 + 1                              # rows plus the backlog
    assert holding.cache_stats()["kv"]["held_rounds"] > 0
    for job, spec in zip(jobs, specs):
        info = queue.get_job(job.id)
        want = alone(engine, queue, spec.adapter, spec.prompt, spec.sampling["max_tokens"])
        assert info.status == "succeeded" and info.result.token_ids == want
