"""A batch ingested in chunks (one transaction; on PostgreSQL one COPY kept open across
chunks): every job and refused line lands, in order, and counted; an error in any chunk
(quota, unknown adapter, the chunk source itself) leaves nothing behind."""
from __future__ import annotations

import pytest

from lorry.scheduler import JobSpec, errors
from lorry.scheduler.types import LineError


@pytest.fixture
def tenant(queue):
    t, _ = queue.create_tenant("acme")
    queue.register_adapter("early", "/adapters/early")
    queue.register_adapter("late", "/adapters/late", tenant_id=t.id)
    return t


def chunk(start: int, n: int, adapter: str | None = "early", refused: int = 0):
    """(specs, refused lines) of input lines start.. start+n+refused-1."""
    specs = [JobSpec(adapter, messages=[{"role": "user", "content": f"héllo\t{i}\n\\"}],
                     sampling={"max_tokens": 4, "temperature": 0.5}, custom_id=f"c{i}")
             if i % 2 else JobSpec(adapter, prompt=f"p{i}", custom_id=f"c{i}")
             for i in range(start, start + n)]
    lines = [LineError(start + n + k + 1, "invalid_json", f"line {start + n + k + 1}: bad")
             for k in range(refused)]
    return specs, lines


def batch_jobs(queue, tenant, batch_id):
    return list(queue.batch_results(batch_id, tenant.id))


def test_chunks_with_refused_lines_and_new_adapters_land_in_order(queue, tenant):
    chunks = [chunk(0, 100, refused=2), chunk(200, 70, adapter="late", refused=1),
              chunk(300, 5, adapter=None), ([], [LineError(999, "line_too_large", "big")]),
              chunk(400, 90)]
    info, created = queue.ingest_batch(tenant.id, iter(chunks), completion_window="2h")
    assert created and info.status == "in_progress"
    assert info.request_counts == {"total": 269, "completed": 0, "failed": 4}
    jobs = batch_jobs(queue, tenant, info.id)
    want = [s for specs, _ in chunks for s in specs]
    assert [j.custom_id for j in jobs] == [s.custom_id for s in want]
    assert [(j.adapter, j.prompt, j.messages, j.sampling) for j in jobs] == [
        (s.adapter, s.prompt, s.messages, s.sampling) for s in want]
    assert {j.deadline for j in jobs} == {info.expires_at}
    assert [e.line for e in queue.batch_errors(info.id, tenant.id)] == [101, 102, 271, 999]
    depth = {(a, n) for status, a, _, n in queue.queue_depth() if status == "queued"}
    assert depth == {("early", 190), ("late", 70), (None, 5)}
    claimed = [j for mb in queue.claim("w", [], [], 500) for j in mb.jobs]
    assert len(claimed) == 265


def test_quota_passed_in_a_later_chunk_queues_nothing(queue):
    tenant, _ = queue.create_tenant("small", max_queued=250)
    queue.register_adapter("early", "/adapters/early")
    queue.submit(tenant.id, [JobSpec(None, prompt=str(i)) for i in range(20)])
    with pytest.raises(errors.QuotaExceeded) as e:
        queue.ingest_batch(tenant.id, iter([chunk(0, 100), chunk(100, 100), chunk(200, 100)]))
    assert (e.value.queued, e.value.requested, e.value.max_queued) == (220, 100, 250)
    assert len(queue.list_jobs(tenant.id, limit=1000)) == 20
    assert queue.list_batches(tenant.id) == []


def test_unknown_adapter_in_a_later_chunk_queues_nothing(queue, tenant):
    with pytest.raises(errors.UnknownAdapter, match="nope"):
        queue.ingest_batch(tenant.id, iter([chunk(0, 100), chunk(100, 100, refused=1),
                                            chunk(300, 80, adapter="nope")]))
    assert queue.list_jobs(tenant.id) == [] and queue.list_batches(tenant.id) == []


def test_an_error_from_the_chunk_source_queues_nothing_and_the_queue_goes_on(queue, tenant):
    def chunks():
        yield chunk(0, 100)
        yield chunk(100, 100)
        raise ValueError("the upload broke off")

    with pytest.raises(ValueError, match="broke off"):
        queue.ingest_batch(tenant.id, chunks())
    assert queue.list_jobs(tenant.id) == [] and queue.list_batches(tenant.id) == []
    info, _ = queue.ingest_batch(tenant.id, iter([chunk(0, 100)]))
    assert info.request_counts["total"] == 100
    assert len(batch_jobs(queue, tenant, info.id)) == 100


def test_a_duplicate_custom_id_across_chunks_queues_nothing(queue, tenant):
    with pytest.raises(errors.InvalidJob, match="duplicate custom_id 'c150'"):
        queue.ingest_batch(tenant.id, iter([chunk(100, 100), chunk(150, 10)]))
    assert queue.list_jobs(tenant.id) == []


def test_a_custom_id_of_512_characters_lands_whole(queue, tenant):
    """Batch lines may carry 512 characters of custom_id (api.batch_fast.CUSTOM_ID_LENGTH);
    the column held 200, and on PostgreSQL one such line failed the whole batch (a 500)."""
    from lorry.api.batch_fast import CUSTOM_ID_LENGTH

    longest = "é" + "x" * (CUSTOM_ID_LENGTH[1] - 1)
    specs = [JobSpec("early", prompt="p", custom_id=longest),
             JobSpec("early", prompt="q", custom_id="y" * 201)]
    info, created = queue.ingest_batch(tenant.id, iter([(specs, [])]), completion_window="2h")
    assert created and info.request_counts["total"] == 2
    assert [j.custom_id for j in batch_jobs(queue, tenant, info.id)] == [longest, "y" * 201]
