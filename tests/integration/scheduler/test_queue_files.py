"""Files in the database (tenancy, idempotency, chunked bytes, delete) and the OpenAI batch
lifecycle built on them: streamed ingest with refused lines, finalizing into output and error
files, failed / cancelled / expired batches."""
from __future__ import annotations

import json

import pytest

from lorry.scheduler import JobSpec, LineError, Result, errors
from lorry.scheduler.files import CHUNK_BYTES


@pytest.fixture
def tenant(queue):
    t, _ = queue.create_tenant("acme")
    queue.register_adapter("sql", "/adapters/sql")
    return t


def content(queue, file_id, tenant_id) -> bytes:
    return b"".join(queue.file_content(file_id, tenant_id))


def lines_of(queue, file_id, tenant_id) -> list[dict]:
    return [json.loads(x) for x in content(queue, file_id, tenant_id).splitlines()]


def test_files_are_stored_in_chunks_and_belong_to_their_tenant(queue, tenant):
    other, _ = queue.create_tenant("other")
    data = b"".join(b'{"n": %d}\n' % i for i in range(CHUNK_BYTES // 8))  # > 1 chunk
    pieces = (data[i:i + 777] for i in range(0, len(data), 777))
    f, created = queue.create_file(tenant.id, pieces, filename="in.jsonl")
    assert created and f.bytes == len(data) and f.lines == CHUNK_BYTES // 8
    assert f.purpose == "batch" and f.status == "processed"
    assert content(queue, f.id, tenant.id) == data
    assert queue.get_file(f.id, other.id) is None and content(queue, f.id, other.id) == b""
    assert queue.list_files(other.id) == [] and queue.delete_file(f.id, other.id) is False
    assert [x.id for x in queue.list_files(tenant.id)] == [f.id]
    assert queue.delete_file(f.id, tenant.id) is True
    assert queue.get_file(f.id, tenant.id) is None and content(queue, f.id, tenant.id) == b""
    assert queue.delete_file(f.id, tenant.id) is False


def test_an_idempotency_key_returns_the_first_file(queue, tenant):
    first, created = queue.create_file(tenant.id, [b"a\n"], filename="a", idempotency_key="k")
    again, created_again = queue.create_file(tenant.id, [b"other\n"], filename="b",
                                             idempotency_key="k")
    assert (created, created_again) == (True, False) and again == first
    assert content(queue, first.id, tenant.id) == b"a\n"
    other, _ = queue.create_tenant("other")  # keys are per tenant
    theirs, created = queue.create_file(other.id, [b"b\n"], filename="b", idempotency_key="k")
    assert created and theirs.id != first.id


def test_file_refusals(queue, tenant):
    with pytest.raises(errors.InvalidJob, match="purpose"):
        queue.create_file(tenant.id, [b"x"], filename="x", purpose="fine-tune")
    with pytest.raises(errors.InvalidJob, match="filename"):
        queue.create_file(tenant.id, [b"x"], filename="bad\x00name")
    with pytest.raises(errors.UnknownTenant):
        queue.create_file("tenant_nope", [b"x"], filename="x")
    assert queue.list_files(tenant.id) == []


def test_a_tenants_files_stay_under_the_storage_limit_even_when_raced(queue, tenant):
    """Nothing bounded what one tenant could store: three 147 MB uploads took the database
    from 68 MB to 505 MB. Uploads racing at the limit: only those that fit are stored."""
    import threading

    other, _ = queue.create_tenant("other")
    queue.create_file(other.id, [b"o" * 900], filename="o.jsonl", max_tenant_bytes=1000)
    first, _ = queue.create_file(tenant.id, [b"a" * 400], filename="a.jsonl",
                                 max_tenant_bytes=1000)  # the other tenant's bytes count not
    with pytest.raises(errors.StorageFull, match="700 bytes.*1000 bytes"):
        queue.create_file(tenant.id, [b"b" * 350, b"b" * 350], filename="b.jsonl",
                          max_tenant_bytes=1000)
    assert [f.id for f in queue.list_files(tenant.id)] == [first.id]  # nothing half-stored
    outcomes = []

    def upload(i):
        try:
            queue.create_file(tenant.id, [b"c" * 350], filename=f"c{i}.jsonl",
                              max_tenant_bytes=1000)
            outcomes.append("stored")
        except errors.StorageFull:
            outcomes.append("full")

    racers = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sorted(outcomes) == ["full", "full", "full", "stored"]
    assert sum(f.bytes for f in queue.list_files(tenant.id)) == 750
    assert queue.delete_file(first.id, tenant.id)
    queue.create_file(tenant.id, [b"d" * 600], filename="d.jsonl", max_tenant_bytes=1000)


def test_file_list_pages_in_both_orders(queue, tenant, clock):
    ids = []
    for i in range(5):
        ids.append(queue.create_file(tenant.id, [b"x\n"], filename=f"{i}")[0].id)
        clock.advance(1)
    assert [f.id for f in queue.list_files(tenant.id, limit=2)] == ids[::-1][:2]
    assert [f.id for f in queue.list_files(tenant.id, after=ids[3], limit=2)] == [ids[2], ids[1]]
    assert [f.id for f in queue.list_files(tenant.id, order="asc", after=ids[1])] == ids[2:]
    with pytest.raises(ValueError, match="not a file id"):
        queue.list_files(tenant.id, after="file-nope")


def chunked(n_chunks: int, per_chunk: int, refused_every: int = 0):
    """Chunks of specs with a refused line every refused_every lines (line numbers 1-based)."""
    line = 0
    for _ in range(n_chunks):
        specs, refused = [], []
        for _ in range(per_chunk):
            line += 1
            if refused_every and line % refused_every == 0:
                refused.append(LineError(line, "invalid_request", f"line {line}: bad",
                                         "body", f"c{line}"))
            else:
                specs.append(JobSpec("sql", prompt=f"p{line}", custom_id=f"c{line}"))
        yield specs, refused


def test_ingest_keeps_refused_lines_and_finalizes_into_files(queue, tenant):
    batch, created = queue.ingest_batch(tenant.id, chunked(3, 4, refused_every=5),
                                        endpoint="/v1/completions", model="base-model",
                                        input_file_id="file-x")
    assert created and batch.status == "in_progress" and batch.in_progress_at is not None
    assert batch.request_counts == {"total": 12, "completed": 0, "failed": 2}
    assert batch.endpoint == "/v1/completions" and batch.input_file_id == "file-x"
    assert [(e.line, e.custom_id) for e in queue.batch_errors(batch.id, tenant.id)] == [
        (5, "c5"), (10, "c10")]
    jobs = [j for mb in queue.claim("w", [], [], free_slots=64) for j in mb.jobs]
    assert sorted(j.prompt for j in jobs) == sorted(f"p{i}" for i in range(1, 13) if i % 5)
    for j in jobs:
        if j.prompt == "p3":
            queue.fail(j.id, j.lease_token, "boom", retryable=False)
        else:
            queue.complete(j.id, j.lease_token, Result(j.prompt.upper(), [1], "stop", 1, 1))
    assert queue.finalize_batches() == 1 and queue.finalize_batches() == 0
    done = queue.get_batch(batch.id, tenant.id)
    assert done.status == "completed" and done.finalizing_at and done.completed_at
    assert done.request_counts == {"total": 12, "completed": 9, "failed": 3}
    out = lines_of(queue, done.output_file_id, tenant.id)
    assert [x["custom_id"] for x in out] == [f"c{i}" for i in range(1, 13) if i % 5 and i != 3]
    assert out[0]["response"]["body"]["choices"][0]["text"] == "P1"
    assert out[0]["response"]["body"]["model"] == "sql"
    errs = lines_of(queue, done.error_file_id, tenant.id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errs] == [
        ("c5", "invalid_request"), ("c10", "invalid_request"), ("c3", "job_failed")]
    output = queue.get_file(done.output_file_id, tenant.id)
    assert output.purpose == "batch_output" and output.batch_id == batch.id and output.lines == 9


def test_a_batch_without_an_accepted_line_is_failed_at_once(queue, tenant):
    batch, _ = queue.ingest_batch(tenant.id, chunked(1, 2, refused_every=1))
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.request_counts == {"total": 2, "completed": 0, "failed": 2}
    assert batch.output_file_id is None
    assert [e["custom_id"] for e in lines_of(queue, batch.error_file_id, tenant.id)] == [
        "c1", "c2"]
    assert queue.finalize_batches() == 0


def test_ingest_is_all_or_nothing_and_idempotent(queue, tenant):
    def broken():
        yield from chunked(1, 3)
        raise RuntimeError("the upload went away")
    with pytest.raises(RuntimeError):
        queue.ingest_batch(tenant.id, broken(), idempotency_key="b1")
    assert queue.list_batches(tenant.id) == [] and queue.list_jobs(tenant.id) == []
    first, created = queue.ingest_batch(tenant.id, chunked(2, 3), idempotency_key="b1")
    again, created_again = queue.ingest_batch(tenant.id, broken(), idempotency_key="b1")
    assert (created, created_again) == (True, False) and again.id == first.id
    assert len(queue.list_jobs(tenant.id)) == 6
    with pytest.raises(errors.InvalidJob, match="duplicate custom_id"):
        queue.ingest_batch(tenant.id, [([JobSpec(None, prompt="a", custom_id="x")], []),
                                       ([JobSpec(None, prompt="b", custom_id="x")], [])])
    assert len(queue.list_batches(tenant.id)) == 1


def test_cancelled_and_expired_batches_get_error_files(queue, tenant, clock):
    cancelled, _ = queue.ingest_batch(tenant.id, chunked(1, 2))
    assert queue.cancel_batch(cancelled.id, tenant.id).status == "cancelling"
    expiring, _ = queue.ingest_batch(tenant.id, chunked(1, 2), completion_window="1h")
    clock.advance(2 * 3600)
    queue.expire_deadlines()
    assert queue.finalize_batches() == 2
    c = queue.get_batch(cancelled.id, tenant.id)
    assert c.status == "cancelled" and c.cancelled_at and c.output_file_id is None
    assert {e["error"]["code"] for e in lines_of(queue, c.error_file_id, tenant.id)} == {
        "batch_cancelled"}
    x = queue.get_batch(expiring.id, tenant.id)
    assert x.status == "expired" and x.expired_at
    assert {e["error"]["code"] for e in lines_of(queue, x.error_file_id, tenant.id)} == {
        "batch_expired"}


def test_list_batches_pages_newest_first(queue, tenant, clock):
    made = []
    for _ in range(4):
        made.append(queue.ingest_batch(tenant.id, chunked(1, 1))[0].id)
        clock.advance(1)
    assert [b.id for b in queue.list_batches(tenant.id, limit=3)] == made[::-1][:3]
    assert [b.id for b in queue.list_batches(tenant.id, after=made[1])] == [made[0]]
    other, _ = queue.create_tenant("other")
    assert queue.list_batches(other.id) == []
