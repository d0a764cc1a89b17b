"""OpenAI's Files, Batches and Models as the official `openai` SDK drives them (in process:
the SDK over FastAPI's TestClient, the real queue on SQLite, a test worker)."""
from __future__ import annotations

import io
import json
import time

import openai
import pytest
from fastapi.testclient import TestClient

from lorry.scheduler import Result
from lorry.scheduler.types import adapter_failure


def finish_all(queue) -> None:
    """Play a worker: fail the requests whose message says FAIL (UNLOADABLE: as a worker
    that cannot load the adapter), echo the others (2 prompt tokens, 1 of them cached)."""
    while batches := queue.claim("test-worker", [], [], 64):
        for job in (j for mb in batches for j in mb.jobs):
            said = job.prompt or job.messages[-1]["content"]
            if said == "FAIL":
                queue.fail(job.id, job.lease_token, "boom", retryable=False)
            elif said == "UNLOADABLE":
                queue.fail(job.id, job.lease_token, adapter_failure(job.adapter, "gone"),
                           retryable=False)
            else:
                queue.complete(job.id, job.lease_token,
                               Result(f"echo {said}", [1], "stop", 2, 1, 1))


def sdk(app, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                         http_client=TestClient(app))


def line(cid: str, model: str = "tiny-llama", content: str = "hi",
         url: str = "/v1/chat/completions", **body) -> dict:
    if url == "/v1/chat/completions":
        body = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    else:
        body = {"model": model, "prompt": content, **body}
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in records)


def chat_batch(client: openai.OpenAI, *records, filename: str = "in.jsonl"):
    """Upload ``records`` as a batch input file and create a chat batch of it (24h)."""
    f = client.files.create(file=(filename, jsonl(*records)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


@pytest.fixture
def alice(service):
    app, queue, *_ = service
    tenant, key = queue.create_tenant("alice")
    client = sdk(app, key)
    client.tenant = tenant
    return client


@pytest.fixture
def bob(service):
    app, queue, *_ = service
    tenant, key = queue.create_tenant("bob")
    return sdk(app, key)


def test_an_upload_past_the_tenants_storage_limit_is_413_and_stores_nothing(service, alice):
    service[2].max_file_bytes_per_tenant = 300
    content = jsonl(line("a"), line("b"))
    assert len(content) > 150
    kept = alice.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    with pytest.raises(openai.APIStatusError) as e:
        alice.files.create(file=("more.jsonl", io.BytesIO(content)), purpose="batch")
    assert e.value.status_code == 413 and e.value.code == "storage_quota_exceeded"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert "LORRY_MAX_FILE_BYTES_PER_TENANT" in e.value.message
    assert [f.id for f in alice.files.list()] == [kept.id]
    service[2].max_file_bytes_per_tenant = 10 ** 6
    first = alice.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", extra_headers={
                                     "Idempotency-Key": "b1"})
    service[2].max_file_bytes_per_tenant = len(content)   # full: no new batch either
    with pytest.raises(openai.APIStatusError) as e:
        alice.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert e.value.status_code == 413 and e.value.code == "storage_quota_exceeded"
    again = alice.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", extra_headers={
                                     "Idempotency-Key": "b1"})   # a retry: its batch
    assert again.id == first.id and [b.id for b in alice.batches.list()] == [first.id]
    service[2].max_file_bytes_per_tenant = 300
    alice.files.delete(kept.id)
    alice.files.create(file=("more.jsonl", io.BytesIO(content)), purpose="batch")


def test_file_upload_list_retrieve_content_delete(alice, bob):
    content = jsonl(line("a"), line("b"))
    f = alice.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == len(content) and f.purpose == "batch"
    assert f.filename == "in.jsonl" and f.status == "processed"
    assert alice.files.retrieve(f.id).bytes == len(content)
    assert alice.files.content(f.id).content == content
    assert [x.id for x in alice.files.list()] == [f.id]
    with pytest.raises(openai.NotFoundError) as e:
        bob.files.retrieve(f.id)
    assert e.value.body["message"] == f"no file {f.id!r}" and e.value.code == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        bob.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(f.id)
    assert list(bob.files.list()) == []
    assert alice.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(f.id)
    assert list(alice.files.list()) == []


def test_file_list_pages_with_a_cursor(alice):
    ids = [alice.files.create(file=(f"{i}.jsonl", jsonl(line("x"))), purpose="batch").id
           for i in range(5)]
    page = alice.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    assert [f.id for f in alice.files.list(limit=2, order="asc")] == ids  # auto-paging
    assert [f.id for f in alice.files.list(order="desc")] == ids[::-1]


def test_other_purposes_are_400_and_too_large_is_413(service, alice):
    _, _, settings, _ = service
    with pytest.raises(openai.BadRequestError) as e:
        alice.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert "purpose 'fine-tune' is not supported" in e.value.body["message"]
    assert e.value.code == "invalid_purpose"
    with pytest.raises(openai.APIStatusError) as e:
        alice.files.create(file=("big.jsonl", b"x" * (settings.max_body_bytes + 1)),
                           purpose="batch")
    assert e.value.status_code == 413 and str(settings.max_body_bytes) in e.value.body["message"]
    assert list(alice.files.list()) == []


def test_blank_lines_do_not_count_against_the_batch_line_limit(service, alice):
    """A file of max_batch_lines requests and a trailing blank line was refused 413 (its
    newlines were counted; a bulk audit); one request more still is."""
    _, queue, settings, _ = service
    n = settings.max_batch_lines
    full = jsonl(*[line(f"c{i}") for i in range(n)]) + b"\n\n"
    f = alice.files.create(file=("in.jsonl", io.BytesIO(full)), purpose="batch")
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert b.request_counts.total == n
    over = jsonl(*[line(f"d{i}") for i in range(n + 1)])
    f = alice.files.create(file=("over.jsonl", io.BytesIO(over)), purpose="batch")
    with pytest.raises(openai.APIStatusError) as e:
        alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert e.value.status_code == 413
    assert f"has {n + 1} request lines, over the limit of {n}" in e.value.body["message"]
    assert len(queue.list_jobs(alice.tenant.id, limit=1000)) == n


def test_idempotency_key_returns_the_same_file_and_batch(service, alice):
    _, queue, *_ = service
    content = jsonl(line("a"))
    hdr = {"Idempotency-Key": "upload-1"}
    first = alice.files.with_raw_response.create(file=("a.jsonl", content), purpose="batch",
                                                 extra_headers=hdr)
    again = alice.files.with_raw_response.create(file=("a.jsonl", content), purpose="batch",
                                                 extra_headers=hdr)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.parse().id == again.parse().id and len(list(alice.files.list())) == 1
    hdr = {"Idempotency-Key": "batch-1"}
    b1 = alice.batches.create(input_file_id=first.parse().id, endpoint="/v1/chat/completions",
                              completion_window="24h", extra_headers=hdr)
    b2 = alice.batches.create(input_file_id=first.parse().id, endpoint="/v1/chat/completions",
                              completion_window="24h", extra_headers=hdr)
    assert b1.id == b2.id and len(alice.batches.list().data) == 1
    assert len(queue.list_jobs(alice.tenant.id)) == 1
    # the key of another request: 409, not the old batch in silence (a bulk audit)
    other = alice.files.create(file=("b.jsonl", jsonl(line("b", url="/v1/completions"))),
                               purpose="batch")
    for file_id, endpoint in ((other.id, "/v1/chat/completions"),
                              (first.parse().id, "/v1/completions")):
        with pytest.raises(openai.ConflictError) as e:
            alice.batches.create(input_file_id=file_id, endpoint=endpoint,
                                 completion_window="24h", extra_headers=hdr)
        assert e.value.code == "idempotency_key_reused" and b1.id in e.value.body["message"]
    assert len(alice.batches.list().data) == 1 and len(queue.list_jobs(alice.tenant.id)) == 1


def test_a_reused_idempotency_key_that_loses_the_race_is_409_too(service, alice, monkeypatch):
    """Two creates under one key at once: both pass the early look-up; the one whose insert
    meets the other's batch compares too, never answering another request's batch."""
    _, queue, *_ = service
    hdr = {"Idempotency-Key": "race-1"}
    a = alice.files.create(file=("a.jsonl", jsonl(line("a"))), purpose="batch")
    b = alice.files.create(file=("b.jsonl", jsonl(line("b"))), purpose="batch")
    won = alice.batches.create(input_file_id=a.id, endpoint="/v1/chat/completions",
                               completion_window="24h", extra_headers=hdr)
    monkeypatch.setattr(queue, "batch_by_key", lambda *args: None)   # as if still unseen
    with pytest.raises(openai.ConflictError) as e:
        alice.batches.create(input_file_id=b.id, endpoint="/v1/chat/completions",
                             completion_window="24h", extra_headers=hdr)
    assert e.value.code == "idempotency_key_reused" and won.id in e.value.body["message"]
    same = alice.batches.create(input_file_id=a.id, endpoint="/v1/chat/completions",
                                completion_window="24h", extra_headers=hdr)
    assert same.id == won.id and len(queue.list_jobs(alice.tenant.id)) == 1


def test_a_line_under_the_other_endpoints_url_is_refused_for_its_url(service, alice):
    """A chat line whose url says /v1/completions was refused as "a /v1/completions line
    needs body.prompt": its body was right for the batch, the url was what was wrong."""
    chat_under_completions = {**line("c1"), "url": "/v1/completions"}
    prompt_under_chat = {**line("p1", url="/v1/completions"), "url": "/v1/chat/completions"}
    batch = chat_batch(alice, line("ok"), chat_under_completions)
    [err] = batch.errors.data
    assert (err.line, err.code, err.param) == (2, "invalid_url", "url")
    assert "differs from the batch's endpoint '/v1/chat/completions'" in err.message
    # a line too deep for the JSON parser (json_too_deep) stays a line error, not a 500
    deep = alice.files.create(file=("in.jsonl", jsonl(line("ok"), b"[" * 2000 + b"]" * 2000)),
                              purpose="batch")
    [err] = alice.batches.create(input_file_id=deep.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").errors.data
    assert (err.line, err.code) == (2, "json_too_deep")
    # the batch's url over the other endpoint's body: the body is what is wrong
    g = alice.files.create(file=("in.jsonl", jsonl(line("ok"), prompt_under_chat)),
                           purpose="batch")
    [err] = alice.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").errors.data
    assert err.line == 2 and err.code != "invalid_url" and "messages" in err.message, err


def test_batch_lifecycle_output_and_error_files(service, alice, adapter_root):
    _, queue, *_ = service
    alice.post("/adapters", cast_to=object,
               body={"name": "alpha", "source": str(adapter_root / "alpha")})
    content = jsonl(line("base-1", content="one"), line("alpha-1", model="alpha", content="two"),
                    line("fails", content="FAIL", url="/v1/completions"),
                    line("no-such-model", model="nosuch"), b"{broken",
                    line("fail-2", model="alpha", content="FAIL"),
                    line("gone-1", model="alpha", content="UNLOADABLE"))
    f = alice.files.create(file=("in.jsonl", content), purpose="batch")
    batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"run": "nightly"})
    assert batch.status == "in_progress" and batch.input_file_id == f.id
    assert batch.endpoint == "/v1/chat/completions" and batch.metadata == {"run": "nightly"}
    assert batch.in_progress_at and batch.created_at and batch.expires_at
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.model == "tiny-llama" and batch.usage is None    # summed when it finalizes
    assert (batch.request_counts.total, batch.request_counts.failed) == (7, 3)
    got = alice.batches.retrieve(batch.id)
    refused = {e.line: e for e in got.errors.data}
    # a completions line in a chat batch, unknown model, bad JSON
    assert sorted(refused) == [3, 4, 5]
    assert refused[3].code == "invalid_url" and refused[4].code == "model_not_found"
    assert refused[5].code == "invalid_json"
    assert {n: e.model_extra["custom_id"] for n, e in refused.items()} == {
        3: "fails", 4: "no-such-model", 5: None}

    finish_all(queue)
    assert queue.finalize_batches() == 1
    done = alice.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 5)
    out = [json.loads(x) for x in alice.files.content(done.output_file_id).text.splitlines()]
    assert [(x["custom_id"], x["response"]["body"]["model"]) for x in out] == [
        ("base-1", "tiny-llama"), ("alpha-1", "alpha")]
    assert out[1]["response"]["body"]["choices"][0]["message"]["content"] == "echo two"
    # usage: the succeeded lines' tokens, as their own usage says (failed lines count none)
    used = [x["response"]["body"]["usage"] for x in out]
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in used) > 0
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in used) > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert [u["prompt_tokens_details"] for u in used] == [{"cached_tokens": 1}] * 2
    assert done.usage.input_tokens_details.cached_tokens == 2
    assert done.model == "tiny-llama"
    # the keys of the synchronous answer, which the SDK's ChatCompletion parses
    assert set(out[1]["response"]["body"]) == {"id", "object", "created", "model", "choices",
                                               "usage", "system_fingerprint"}
    errs = [json.loads(x) for x in alice.files.content(done.error_file_id).text.splitlines()]
    assert [(x["custom_id"], x["error"]["code"]) for x in errs] == [
        ("fails", "invalid_url"), ("no-such-model", "model_not_found"), (None, "invalid_json"),
        ("fail-2", "job_failed"), ("gone-1", "adapter_unloadable")]
    meta = alice.files.retrieve(done.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes > 0
    assert done.error_file_id in {x.id for x in alice.files.list(purpose="batch_output")}


def test_usage_counts_succeeded_requests_only_not_a_cancelled_ones_partial_tokens(service,
                                                                               alice):
    from lorry.scheduler import Result

    _, queue, *_ = service
    batch = chat_batch(alice, line("done", content="done"), line("stopped", content="stopped"))
    jobs = {j.messages[-1]["content"]: j
            for mb in queue.claim("test-worker", [], [], 64) for j in mb.jobs}
    queue.complete(jobs["done"].id, jobs["done"].lease_token,
                   Result("echo", [1, 2, 3], "length", 5, 3, 4))
    # a worker stopped on a cancel request keeps the partial output as its result
    queue.complete(jobs["stopped"].id, jobs["stopped"].lease_token,
                   Result("par", [4, 5], "abort", 7, 2, 6), cancelled=True)
    assert queue.finalize_batches() == 1
    done = alice.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 3)
    assert done.usage.total_tokens == 8 and done.usage.input_tokens_details.cached_tokens == 4
    [listed] = [b for b in alice.batches.list() if b.id == batch.id]
    assert listed.usage == done.usage


def test_a_batch_with_no_valid_line_is_failed_with_its_error_file(alice):
    batch = chat_batch(alice, b"[1]", line("x", model="nosuch"), filename="bad.jsonl")
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert (batch.usage.input_tokens, batch.usage.total_tokens) == (0, 0)    # nothing ran
    assert batch.usage.input_tokens_details.cached_tokens == 0
    assert [e.line for e in batch.errors.data] == [1, 2]
    errs = alice.files.content(batch.error_file_id).text.splitlines()
    assert [json.loads(x)["custom_id"] for x in errs] == [None, "x"]


def test_batch_create_refusals(service, alice, bob):
    f = alice.files.create(file=("in.jsonl", jsonl(line("a"), line("a"))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert e.value.code == "duplicate_custom_id" and "already used on line 1" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                           completion_window="24h")
    assert e.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as e:
        alice.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                             completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    for blank in (b"", b"\n", b"  \n\n"):     # no request line: empty, blank lines only
        empty = alice.files.create(file=("empty.jsonl", blank), purpose="batch")
        with pytest.raises(openai.BadRequestError) as e:
            alice.batches.create(input_file_id=empty.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
        assert (e.value.code, e.value.body["param"]) == ("empty_batch", "input_file_id")
        assert "has no request lines" in str(e.value)
    assert list(alice.batches.list()) == []


def test_batches_list_pages_and_cancel(service, alice, bob):
    _, queue, *_ = service
    f = alice.files.create(file=("in.jsonl", jsonl(line("a"), line("b"))), purpose="batch")
    made = [alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(5)]
    page = alice.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert page.model_extra["first_id"] == made[-1] and page.model_extra["last_id"] == made[-2]
    assert [b.id for b in alice.batches.list(limit=2)] == made[::-1]  # follows the cursor
    assert list(bob.batches.list()) == []
    cancelled = alice.batches.cancel(made[0])
    assert cancelled.status == "cancelling" and cancelled.cancelling_at
    queue.finalize_batches()
    final = alice.batches.retrieve(made[0])
    assert final.status == "cancelled" and final.output_file_id is None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (0, 0)   # nothing ran
    errs = alice.files.content(final.error_file_id).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in errs) == ["a", "b"]
    assert {json.loads(x)["error"]["code"] for x in errs} == {"batch_cancelled"}


def test_models_list_base_and_adapters(service, alice, bob, adapter_root):
    _, queue, *_ = service
    queue.register_adapter("beta", str(adapter_root / "beta"))  # shared
    alice.post("/adapters", cast_to=object,
               body={"name": "alpha", "source": str(adapter_root / "alpha")})
    models = {m.id: m.owned_by for m in alice.models.list()}
    assert models == {"tiny-llama": "lorry", "alpha": "alice", "beta": "shared"}
    assert {m.id for m in bob.models.list()} == {"tiny-llama", "beta"}
    assert alice.models.retrieve("alpha").owned_by == "alice"
    # "base" names the base model in every request's model: retrieve takes it too
    assert (alice.models.retrieve("base").id, alice.models.retrieve("base").owned_by) == (
        "base", "lorry")
    with pytest.raises(openai.NotFoundError) as e:
        bob.models.retrieve("alpha")
    assert "no model 'alpha'" in e.value.body["message"]


def test_the_openapi_document_is_valid_and_lists_the_openai_routes(service):
    from openapi_spec_validator import validate

    app, *_ = service
    doc = app.openapi()
    validate(doc)
    paths = doc["paths"]
    assert {"/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches",
            "/v1/batches/{batch_id}", "/v1/models", "/v1/models/{model_id}"} <= set(paths)
    create = paths["/v1/batches"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/jsonl", "multipart/form-data"} <= set(create)
    assert "413" in paths["/v1/files"]["post"]["responses"]


def test_cancel_answers_the_batch_as_retrieve_does(alice):
    """batches.cancel returns the Batch object: with its refused lines under errors, as
    batches.retrieve shows them (the cancel answer had errors null)."""
    batch = chat_batch(alice, line("a"), line("b", model="nosuch"))
    cancelled = alice.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert cancelled.errors == alice.batches.retrieve(batch.id).errors
    assert [(e.line, e.code) for e in cancelled.errors.data] == [(2, "model_not_found")]


def test_a_tenant_creating_too_many_batches_at_once_gets_429(service, alice, bob,
                                                             monkeypatch):
    """Each create from a stored file copied the whole file (up to 200 MB) to a temporary
    file: ten at once of one tenant held 2 GB of disk and slowed everyone."""
    import threading

    from lorry.api.routes import batches

    service[2].max_open_ingests = 2
    f = alice.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("a")))), purpose="batch")
    g = bob.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("a")))), purpose="batch")
    gate, inside = threading.Event(), []
    real_spool = batches._spool_file

    def slow_spool(queue, tenant, source):
        inside.append(tenant.id)
        assert gate.wait(10)
        return real_spool(queue, tenant, source)

    monkeypatch.setattr(batches, "_spool_file", slow_spool)
    made = []
    create = lambda: made.append(alice.batches.create(  # noqa: E731
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"))
    holders = [threading.Thread(target=create) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 5
    while len(inside) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = alice.with_options(max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        refused.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert e.value.code == "too_many_open_ingests" and "LORRY_MAX_OPEN_INGESTS" in e.value.message
    one_step = TestClient(service[0]).post(  # the one-step upload counts as well
        "/v1/batches", content=jsonl(line("z")), headers={
            "Authorization": f"Bearer {alice.api_key}", "Content-Type": "application/jsonl"})
    assert one_step.status_code == 429, one_step.text
    assert one_step.json()["error"]["code"] == "too_many_open_ingests"
    other = threading.Thread(target=lambda: made.append(bob.batches.create(
        input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h")))
    other.start()  # another tenant is not held back by alice's
    deadline = time.monotonic() + 5
    while len(inside) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(inside) == 3
    gate.set()
    for t in (*holders, other):
        t.join()
    assert len(made) == 3 and len(list(alice.batches.list())) == 2
    assert alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                completion_window="24h").status == "in_progress"


def test_files_expire_as_their_expires_after_asks(service, alice, bob, monkeypatch):
    """expires_after (files.create) and output_expires_after (batches.create) were refused
    or ignored: a night's uploads and outputs stayed until deleted by hand, against the
    tenant's storage limit. The maintenance pass now deletes them once expired."""
    from datetime import timedelta

    _, queue, *_ = service
    hour = {"anchor": "created_at", "seconds": 3600}
    f = alice.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("a")))), purpose="batch",
                           expires_after=hour)
    assert f.expires_at == f.created_at + 3600
    assert alice.files.retrieve(f.id).expires_at == f.expires_at
    kept = alice.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("k")))), purpose="batch")
    assert kept.expires_at is None
    other = bob.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("b")))), purpose="batch",
                             expires_after={"anchor": "created_at", "seconds": 7200})
    batch = alice.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions",
                                 completion_window="24h",
                                 output_expires_after={"anchor": "created_at", "seconds": 86400})
    finish_all(queue)
    assert queue.finalize_batches() == 1
    done = alice.batches.retrieve(batch.id)
    out = alice.files.retrieve(done.output_file_id)
    assert out.expires_at == out.created_at + 86400
    before = queue.stored_bytes(alice.tenant.id)
    assert queue.upkeep()["files_expired"] == 0           # nothing is due yet
    real_now = queue.now
    monkeypatch.setattr(queue, "now", lambda: real_now() + timedelta(seconds=3601))
    assert queue.upkeep()["files_expired"] == 1           # alice's hour, not bob's two
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(f.id)
    assert queue.stored_bytes(alice.tenant.id) == before - f.bytes
    assert bob.files.retrieve(other.id).id == other.id
    assert alice.files.content(kept.id).text              # no expiry asked: kept
    monkeypatch.setattr(queue, "now", lambda: real_now() + timedelta(days=1, seconds=10))
    assert queue.upkeep()["files_expired"] == 2           # bob's, then the batch's output
    with pytest.raises(openai.NotFoundError):
        alice.files.content(done.output_file_id)
    assert alice.batches.retrieve(batch.id).status == "completed"


@pytest.mark.parametrize("expires, param", [
    ({"anchor": "created_at", "seconds": 60}, "expires_after.seconds"),
    ({"anchor": "created_at", "seconds": 2_592_001}, "expires_after.seconds"),
    ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor")])
def test_an_expiry_out_of_openais_range_is_refused(service, alice, expires, param):
    _, queue, *_ = service
    with pytest.raises(openai.BadRequestError) as e:
        alice.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("a")))), purpose="batch",
                           expires_after=expires)
    assert e.value.body["param"] == param
    assert alice.files.list().data == []                 # nothing stored
    f = alice.files.create(file=("in.jsonl", io.BytesIO(jsonl(line("a")))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h", output_expires_after=expires)
    assert e.value.body["param"].startswith("output_expires_after")
    assert alice.batches.list().data == []


def test_a_batchs_output_route_gives_the_output_files_bytes(service, alice):
    """/v1/batches/{id}/output escaped non-ASCII text (\\u00e9), the stored file does not:
    the same lines, 4% larger (a bulk audit); now byte for byte the same."""
    app, queue, *_ = service
    b = chat_batch(alice, line("é-1", content="héllo wörld 🚚"), line("b", content="plain"))
    finish_all(queue)
    queue.finalize_batches()
    done = alice.batches.retrieve(b.id)
    stored = alice.files.content(done.output_file_id).content
    with TestClient(app) as c:
        routed = c.get(f"/v1/batches/{b.id}/output",
                       headers={"Authorization": f"Bearer {alice.api_key}"}).content
    assert routed == stored and "héllo wörld 🚚".encode() in stored
