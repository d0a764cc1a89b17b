"""Synchronous /v1/chat/completions and /v1/completions over the real app and queue, with a
thread playing the worker (no Redis: the streamed answer comes from the stored result)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from lorry.api.batch_input import parse_line

LOGPROBS = [{"id": 72, "token": "Hi", "logprob": -0.5, "top": [[72, "Hi", -0.5], [9, "Yo", -1.5]]},
            {"id": 1, "token": "</s>", "logprob": -0.1, "top": [[1, "</s>", -0.1], [3, "!", -2.5]]}]


class Worker(threading.Thread):
    """Claims queued jobs and completes them, recording what it claimed."""

    def __init__(self, queue):
        super().__init__(daemon=True)
        self.queue, self.claimed, self.stop = queue, [], threading.Event()

    def run(self):
        from lorry.scheduler import Result

        while not self.stop.wait(0.01):
            for mb in self.queue.claim("test-worker", [], [], 8):
                for job in mb.jobs:
                    self.claimed.append(job)
                    text = "Hi" if job.messages else f"<{job.prompt}>"
                    lp = LOGPROBS if "logprobs" in job.sampling else None
                    self.queue.complete(job.id, job.lease_token,
                                        Result(text, [72, 1], "stop", 7, 2, 4, logprobs=lp))


@pytest.fixture
def worker(service):
    w = Worker(service[1])
    w.start()
    yield w
    w.stop.set()
    w.join()


def test_chat_completion_answers_openai_shape_with_usage_and_logprobs(tenant_a, worker):
    r = tenant_a.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "hello"}],
        "max_completion_tokens": 5, "temperature": 0, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logprobs": True, "top_logprobs": 2, "seed": 3,
        "stop": ["\n"], "user": "u-1", "response_format": {"type": "text"}, "n": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "base"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hi"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 4}}   # OpenAI's shape
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hi", "</s>"]
    assert content[0]["bytes"] == list(b"Hi")
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -1.5]
    [job] = worker.claimed
    assert job.sampling == {"max_tokens": 5, "temperature": 0, "presence_penalty": 0.5,
                            "frequency_penalty": -0.5, "logprobs": 2, "seed": 3, "stop": ["\n"]}
    assert r.headers["x-lorry-job-id"] == job.id   # as a stream's and an error's answers
    info = tenant_a.get(f"/v1/jobs/{job.id}").json()
    assert info["priority"] > 100  # interactive: above any priority a bulk job can have
    assert info["result"]["logprobs"] == LOGPROBS


def test_text_completion_with_logprobs_count(tenant_a, worker):
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "abc", "logprobs": 1,
                                               "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.headers["x-lorry-job-id"] == worker.claimed[-1].id
    choice = r.json()["choices"][0]
    assert r.json()["object"] == "text_completion" and choice["text"] == "<abc>"
    assert choice["logprobs"] == {"tokens": ["Hi", "</s>"], "token_logprobs": [-0.5, -0.1],
                                  "top_logprobs": [{"Hi": -0.5, "Yo": -1.5},
                                                   {"</s>": -0.1, "!": -2.5}],
                                  "text_offset": [0, 2]}
    assert worker.claimed[0].sampling == {"logprobs": 1, "max_tokens": 3}


def test_stream_without_redis_ends_with_the_stored_text_and_done(service, tenant_a, worker):
    with tenant_a.stream("POST", "/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hi"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 9
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}


def test_unknown_model_is_404_naming_the_models(service, tenant_a, adapter_root):
    """The message names each usable model once (a tenant's adapter shadows a shared one of
    the same name)."""
    queue = service[1]
    queue.register_adapter("alpha", str(adapter_root / "alpha"), rank=8)
    queue.register_adapter("alpha", str(adapter_root / "alpha"), tenant_id=tenant_a.tenant.id,
                           rank=8)
    r = tenant_a.post("/v1/chat/completions", json={
        "model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'nope'" in err["message"] and "base model" in err["message"]
    assert err["message"].endswith("one of your adapters: ['alpha']"), err["message"]


@pytest.mark.parametrize("extra, param, words", [
    ({"n": 2}, "n", "n=2 is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "'json_object'"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs=true")])
def test_unsupported_options_are_400(tenant_a, extra, param, words):
    r = tenant_a.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


def test_out_of_range_penalty_is_400(tenant_a):
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "x",
                                               "presence_penalty": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"


@pytest.mark.parametrize("ids", [[-1], [2**31], [3, -7]])
def test_stop_token_ids_outside_a_vocabulary_are_400_and_queue_nothing(service, tenant_a, ids):
    """A negative id was queued and failed at the worker: the sync answer was a 500
    job_failed (a hostile-tenant audit); /v1/jobs refused it already."""
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = tenant_a.post(path, json={"model": "base", "max_tokens": 3, "stop_token_ids": ids,
                                      **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith("stop_token_ids")
    assert service[1].queue_depth() == []


def test_no_result_in_time_is_504_naming_the_job(service, tenant_a):
    service[2].sync_timeout_seconds = 0.2  # no worker runs: the job stays queued
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert r.status_code == 504
    job_id = r.headers["x-lorry-job-id"]
    assert r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["code"] == "timeout" and f"GET /v1/jobs/{job_id}" in err["message"]
    assert tenant_a.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_batch_lines_take_the_same_fields():
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "x"}],
                     "presence_penalty": 1, "frequency_penalty": 0.5, "logprobs": True,
                     "top_logprobs": 4, "user": "u", "response_format": {"type": "text"},
                     "repetition_penalty": 1.2}}
    bad = {**line, "custom_id": "b", "body": {**line["body"], "n": 3}}
    ok = parse_line(1, json.dumps(line).encode())
    assert ok.body.sampling() == {"presence_penalty": 1, "frequency_penalty": 0.5,
                                  "repetition_penalty": 1.2, "logprobs": 4}
    err = parse_line(2, json.dumps(bad).encode())
    assert "n=3 is not supported" in err.message


def test_openapi_documents_the_routes_and_their_errors(service, tenant_a):
    spec = tenant_a.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "404", "504"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] \
                .endswith("/ErrorBody")
        assert "text/event-stream" in responses["200"]["content"]


def test_a_client_leaving_a_stream_cancels_its_job(service, tenant_a):
    """What the server does when the client disconnects (the response's generator is closed
    while it waits): the job is cancelled."""
    import anyio

    from lorry.api.openai_format import ChunkWriter
    from lorry.api.routes.completions import _events, _Job
    from lorry.scheduler import JobSpec

    queue = service[1]
    [info] = queue.submit(tenant_a.tenant.id, [JobSpec(adapter=None, prompt="x")])

    async def leave_after_first_chunk():
        job = _Job(info.id, None, queue, tenant_a.tenant, timeout=30)
        events = _events(job, None, ChunkWriter(info.id, "base", True), logprobs=False,
                         usage=False)
        first = await events.__anext__()
        assert '"role": "assistant"' in first
        await events.aclose()

    anyio.run(leave_after_first_chunk)
    assert queue.get_job(info.id).status == "cancelled"


def _stream_over(queue, tenant, job_id: str, publish, chat: bool, usage: bool) -> list[str]:
    """The SSE events of job_id's answer where each pub/sub read returns ``publish(n)`` (n:
    the read's number from 1; None: nothing published), as the API streams it."""
    import anyio

    from lorry.api.openai_format import ChunkWriter
    from lorry.api.routes import completions

    class PubSub:
        calls = 0

        async def get_message(self, **kw):
            self.calls += 1
            piece = publish(self.calls)
            return None if piece is None else {"type": "message", "data": json.dumps(piece)}

        async def aclose(self):
            pass

    async def stream():
        job = completions._Job(job_id, None, queue, tenant, timeout=30)
        return [e async for e in completions._events(job, (PubSub(), PubSub()),
                                                     ChunkWriter(job_id, "base", chat),
                                                     logprobs=False, usage=usage)]

    return anyio.run(stream)


def test_a_stream_whose_row_was_read_while_running_still_ends_with_usage(service, tenant_a,
                                                                         monkeypatch):
    """The stream reads the job's row while the job runs, then the end arrives by pub/sub:
    the usage chunk and [DONE] still come (from the finished job's result)."""
    from lorry.api.routes import completions
    from lorry.scheduler import JobSpec, Result

    queue = service[1]
    [info] = queue.submit(tenant_a.tenant.id, [JobSpec(adapter=None, prompt="x")])
    monkeypatch.setattr(completions, "STREAM_POLL_S", 0.0)

    def publish(n):
        if n == 1:  # nothing published yet: the stream reads the queued row
            return None
        [mb] = queue.claim("test-worker", [], [], 1)
        queue.complete(info.id, mb.jobs[0].lease_token, Result("Hi", [72, 1], "stop", 7, 2))
        return {"offset": 0, "text": "Hi", "finish_reason": "stop"}

    events = _stream_over(queue, tenant_a.tenant, info.id, publish, chat=False, usage=True)
    assert events[-1] == "data: [DONE]\n\n"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["total_tokens"] == 9


def test_redis_lost_mid_stream_ends_the_stream_from_the_job_row(service, tenant_a,
                                                                monkeypatch):
    """Redis went away during a stream=true answer: get_message raised, the ASGI app died
    mid-stream (the client read an incomplete chunked body) and the job was cancelled with
    part of its text (an outage audit with a real Redis)."""
    import redis

    from lorry.api.routes import completions
    from lorry.scheduler import JobSpec, Result

    queue = service[1]
    [info] = queue.submit(tenant_a.tenant.id, [JobSpec(adapter=None, prompt="x")])
    monkeypatch.setattr(completions, "STREAM_POLL_S", 0.0)

    def publish(n):
        if n == 1:
            return {"offset": 0, "text": "H", "finish_reason": None}
        if n == 2:   # the job ends while Redis is away
            [mb] = queue.claim("test-worker", [], [], 1)
            queue.complete(info.id, mb.jobs[0].lease_token, Result("Hi", [72, 1], "stop", 7, 2))
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        raise AssertionError("read again from a subscription that failed")

    events = _stream_over(queue, tenant_a.tenant, info.id, publish, chat=True, usage=True)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hi"
    assert chunks[-1]["usage"]["total_tokens"] == 9
    assert queue.get_job(info.id).status == "succeeded"   # not cancelled


class Failer(threading.Thread):
    """Claims queued jobs and fails them (not retried) with ``error``."""

    def __init__(self, queue, error: str):
        super().__init__(daemon=True)
        self.queue, self.error, self.stop = queue, error, threading.Event()

    def run(self):
        while not self.stop.wait(0.01):
            for mb in self.queue.claim("test-worker", [], [], 8):
                for job in mb.jobs:
                    self.queue.fail(job.id, job.lease_token, self.error, retryable=False)


@pytest.mark.parametrize("adapter_problem", [True, False])
def test_a_failed_job_is_400_when_its_adapter_cannot_be_loaded_else_500(service, tenant_a,
                                                                         adapter_problem):
    """An adapter the worker cannot load (a Hub id it cannot fetch, a directory gone) is the
    tenant's problem: 400 adapter_unloadable with the worker's reason, not a server error;
    any other failure stays 500 job_failed. Neither is worth retrying."""
    from lorry.scheduler.types import adapter_failure

    error = adapter_failure("my/adapter", "could not be fetched from the Hugging Face Hub") \
        if adapter_problem else "the worker ran out of attempts"
    failer = Failer(service[1], error)
    failer.start()
    try:
        r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "x"})
    finally:
        failer.stop.set()
        failer.join()
    err = r.json()["error"]
    assert r.headers["x-should-retry"] == "false"
    if adapter_problem:
        assert (r.status_code, err["code"], err["param"]) == (400, "adapter_unloadable", "model")
        assert "'my/adapter' cannot be loaded: could not be fetched" in err["message"]
    else:
        assert (r.status_code, err["code"]) == (500, "job_failed")


def test_a_stream_whose_adapter_cannot_be_loaded_ends_with_the_error_event(service, tenant_a):
    """The worker publishes finish_reason "error" when the job's adapter cannot be loaded:
    the stream then ends with one error event naming why (not an empty answer and [DONE])."""
    from lorry.scheduler import JobSpec
    from lorry.scheduler.types import adapter_failure

    queue = service[1]
    [info] = queue.submit(tenant_a.tenant.id, [JobSpec(adapter=None, prompt="x")])

    def publish(n):
        if n > 1:
            return None
        # the worker's last piece; its row is failed a moment later
        [mb] = queue.claim("test-worker", [], [], 1)
        queue.fail(info.id, mb.jobs[0].lease_token, adapter_failure("a", "gone"), False)
        return {"offset": 0, "text": "", "finish_reason": "error"}

    events = _stream_over(queue, tenant_a.tenant, info.id, publish, chat=True, usage=False)
    assert "[DONE]" not in events[-1]
    err = json.loads(events[-1].removeprefix("data: "))["error"]
    assert err["code"] == "adapter_unloadable" and "'a' cannot be loaded: gone" in err["message"]
    assert not any('"finish_reason": "error"' in e for e in events)


def test_the_prompt_is_tokenized_off_the_event_loop(tenant_a, monkeypatch):
    """Counting a long prompt's tokens takes a while (~0.1 s for 200,000 characters): in
    the handler itself it stalled every other request of the server (/healthz went from ~5 to
    ~325 ms beside four such prompts)."""
    import asyncio

    from lorry.api.errors import ApiError
    from lorry.api.routes import completions

    seen = []

    def check(*args):
        try:
            asyncio.get_running_loop()
            seen.append("on the event loop")
        except RuntimeError:
            seen.append("in a worker thread")
        raise ApiError(400, "checked", code="checked")

    monkeypatch.setattr(completions, "check_prompt_length", check)
    for route, body in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                 "content": "x"}]})):
        r = tenant_a.post(route, json={"model": "base", **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "checked", r.text
    assert seen == ["in a worker thread"] * 2


def test_a_database_blip_while_waiting_keeps_waiting_for_the_submitted_job(service, tenant_a,
                                                                           worker, monkeypatch):
    """The job is queued before the call waits for it: a 503 then (the database briefly
    unreachable while polling) made the SDK, which retries 503s, submit a second job while
    the first one ran anyway. The wait reads the job again instead."""
    from lorry.scheduler import errors

    queue = service[1]
    real_get_job, failures = queue.get_job, []

    def flaky_get_job(job_id, tenant_id=None):
        if len(failures) < 3:
            failures.append(job_id)
            raise errors.ConnectionLost()
        return real_get_job(job_id, tenant_id)

    monkeypatch.setattr(queue, "get_job", flaky_get_job)
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "abc"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "<abc>" and len(failures) == 3
    assert [j.id for j in worker.claimed] == [failures[0]]


@pytest.mark.parametrize("seed", [-1, -2**63, 2**63 - 1])
def test_any_int64_seed_is_taken_as_openai_and_vllm_take_it(tenant_a, worker, seed):
    """OpenAI's seed is any int64 (the engine's torch generator takes negative ones too):
    seed=-1 was 422 on the completion routes and in batch lines."""
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "x", "seed": seed})
    assert r.status_code == 200, r.text
    assert worker.claimed[-1].sampling == {"seed": seed}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": "x", "seed": seed}}
    assert parse_line(1, json.dumps(line).encode()).body.sampling() == {"seed": seed}
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "x", "seed": -2**63 - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_a_chat_request_without_max_tokens_may_use_the_context(service, tenant_a, worker):
    """chat.completions.create without max_tokens: as long as the context allows (OpenAI's
    and vLLM's default), not the engine's 16 tokens; text completions keep OpenAI's 16."""
    settings = service[2]
    r = tenant_a.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text
    assert worker.claimed[-1].sampling == {"max_tokens": settings.max_model_len}
    r = tenant_a.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert r.status_code == 200, r.text
    assert worker.claimed[-1].sampling == {}


def test_a_tenant_at_its_open_completions_limit_gets_429_and_others_are_served(service,
                                                                               tenant_a,
                                                                               tenant_b):
    """Each waiting completion polls the database (and a stream holds a Redis connection):
    one tenant's 1,000 idle connections slowed every tenant's answers to seconds."""
    import threading

    service[2].max_open_completions = 2
    service[2].sync_timeout_seconds = 3.0  # no worker runs: the waits end in 504
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    answers = []
    waiting = [threading.Thread(target=lambda: answers.append(
        tenant_a.post("/v1/chat/completions", json=body))) for _ in range(2)]
    for t in waiting:
        t.start()
    queue = service[1]
    deadline = time.monotonic() + 2
    while len(queue.list_jobs(tenant_a.tenant.id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = tenant_a.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "too_many_open_completions"
    assert r.json()["error"]["type"] == "rate_limit_error" and "Retry-After" in r.headers
    assert len(queue.list_jobs(tenant_a.tenant.id)) == 2  # the refused one queued nothing
    other = {}
    t_b = threading.Thread(target=lambda: other.setdefault(
        "r", tenant_b.post("/v1/chat/completions", json=body)))
    t_b.start()
    for t in waiting:
        t.join()
    assert [a.status_code for a in answers] == [504, 504]
    # their slots are free again: a stream takes one and gives it back when it ends
    service[2].sync_timeout_seconds = 0.3
    with tenant_a.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        events = list(s.iter_lines())
    assert any('"code": "timeout"' in e for e in events)
    assert service[0].state.tenant_slots["completions"].open.get(tenant_a.tenant.id) is None
    t_b.join()
    assert other["r"].status_code == 504  # served (queued and waited), not refused


def test_a_stream_whose_client_left_before_the_first_byte_frees_its_slot_and_job(
        service, tenant_a, monkeypatch):
    """The answer's events never began (sending its headers failed): the slot stayed taken
    for the sync timeout and a minute, and the job ran on for nobody."""
    from lorry.api.routes import completions

    sent = {}

    class Gone(completions._EventStream):
        async def __call__(self, scope, receive, send):
            async def fail(message):
                raise OSError("the client is gone")

            sent["response"] = self
            try:
                await super().__call__(scope, receive, fail)
            except OSError:
                pass

    monkeypatch.setattr(completions, "_EventStream", Gone)
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with pytest.raises(AssertionError, match="did not receive any response"):
        tenant_a.post("/v1/chat/completions", json=body)   # nothing was sent: the client left
    assert "response" in sent
    [job] = service[1].list_jobs(tenant_a.tenant.id)
    assert service[1].get_job(job.id).status == "cancelled"
    assert service[0].state.tenant_slots["completions"].open.get(tenant_a.tenant.id) is None


def test_openai_chat_fields_that_change_nothing_here_are_accepted(tenant_a, worker):
    """store, metadata and service_tier (what OpenAI SDK code often sends) were refused extra
    inputs; vLLM takes them, and here every job is stored anyway."""
    r = tenant_a.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "hello"}], "store": True,
        "metadata": {"run": "nightly"}, "service_tier": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hi"
    bad = tenant_a.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "x"}],
        "metadata": {"k": 5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("metadata")


def test_stream_options_without_stream_is_refused_as_openai_does(tenant_a, service):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user",
                                                                "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        r = tenant_a.post(path, json={"model": "base", **body,
                                      "stream_options": {"include_usage": True}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stream_options"
        assert "stream=true" in r.json()["error"]["message"]
    assert service[1].list_jobs(tenant_a.tenant.id) == []    # nothing queued


def test_a_completion_no_worker_took_says_so_at_its_timeout(service, tenant_a):
    """With Redis away (or no worker running) nothing takes the job: the 504 said only that
    it "did not finish", nothing pointing at the workers or their broker (an outage audit)."""
    import threading

    service[2].sync_timeout_seconds = 0.5
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    r = tenant_a.post("/v1/chat/completions", json=body)
    assert r.status_code == 504
    message = r.json()["error"]["message"]
    assert "no worker took it" in message and "LORRY_BROKER_URL" in message
    queue, taken = service[1], threading.Event()
    queue.cancel(r.headers["x-lorry-job-id"], tenant_a.tenant.id)   # it stays queued: not it

    def take():       # a worker that claims the next job and is still running it
        while not taken.is_set():
            if queue.claim("slow-worker", [], [], 1):
                taken.set()
            time.sleep(0.02)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    r = tenant_a.post("/v1/chat/completions", json=body)
    taken.set()
    assert r.status_code == 504
    assert "no worker took it" not in r.json()["error"]["message"]
