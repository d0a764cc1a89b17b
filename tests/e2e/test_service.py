"""The whole service as a user runs it: jobs and an OpenAI batch through real processes."""
from __future__ import annotations

import json

import httpx
import pytest
from procs import run_cli
from prometheus_client.parser import text_string_to_metric_families

from lorry.client import Client
from lorry.errors import NotFound
from tests.e2e.conftest import FLOWER_AUTH, METRICS_TOKEN, create_tenant

PROMPTS = ["The quick brown fox", "Lorry carries", "Once upon a time", "SELECT * FROM"]


@pytest.fixture(scope="module")
def tenants(stack):
    a = Client(stack["api"], create_tenant(stack, "acme"), timeout=30)
    b = Client(stack["api"], create_tenant(stack, "globex"), timeout=30)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def reference(stack):
    """The engine in this process: what each request gives alone (greedy)."""
    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(stack["model"]), device="cpu", max_loras=2,
                                 max_lora_rank=16, max_cpu_loras=4, max_num_seqs=4,
                                 max_model_len=128))

    def alone(adapter, prompt, max_tokens):
        lora = None if adapter is None else LoRARequest(adapter.name, adapter.id, adapter.source)
        [out] = eng.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0),
                             lora_request=[lora], use_tqdm=False)
        return out.outputs[0].token_ids, out.outputs[0].text.replace("\x00", "\ufffd")
    return alone


def metric(api: str, name: str, **labels) -> float:
    resp = httpx.get(f"{api}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status_code == 200, resp.text
    text = resp.text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_jobs_and_batch_through_the_service(stack, tenants, reference):
    a, b = tenants
    adapters = {n: a.add_adapter(n, str(p)) for n, p in stack["adapters"].items()}
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for name in (None, "alpha", "beta"):
            kw = dict(adapter=name, max_tokens=4 + i, temperature=0)
            job = a.submit(messages=[{"role": "user", "content": prompt}], **kw) if i % 2 \
                else a.submit(prompt, **kw)
            jobs.append((job, name, prompt if i % 2 == 0 else
                         [{"role": "user", "content": prompt}], 4 + i))
    records = [{"custom_id": f"line-{k}", "method": "POST", "url": "/v1/completions",
                "body": {"model": model, "prompt": p, "max_tokens": 5, "temperature": 0}}
               for k, (p, model) in enumerate(
                   (p, m) for p in PROMPTS[:2] for m in ("alpha", "beta", "tiny-llama"))]
    batch = a.submit_batch(records)
    assert batch.request_counts.total == len(records)

    for job, name, prompt, max_tokens in jobs:
        done = a.wait(job.id, timeout=180)
        assert done.status == "succeeded", done.error
        want_ids, want_text = reference(adapters.get(name), prompt, max_tokens)
        assert done.result.token_ids == want_ids and done.text == want_text, (name, prompt)

    final = a.wait_batch(batch.id, timeout=120)  # beat's maintain finalizes it
    assert final.status == "completed" and final.request_counts.completed == len(records)
    lines = {x.custom_id: x for x in a.iter_results(batch.id)}
    assert sorted(lines) == sorted(r["custom_id"] for r in records)
    for r in records:
        model = r["body"]["model"]
        _, want_text = reference(adapters.get(model), r["body"]["prompt"], 5)
        line = lines[r["custom_id"]]
        assert line.response["status_code"] == 200 and line.text == want_text
        assert line.response["body"]["object"] == "text_completion"

    # a second tenant sees none of it and cannot cancel it
    with pytest.raises(NotFound):
        b.get(jobs[0][0].id)
    with pytest.raises(NotFound):
        b.cancel(jobs[0][0].id)
    with pytest.raises(NotFound):
        b.batch(batch.id)
    assert list(b.list()) == [] and b.adapters() == []
    assert a.get(jobs[0][0].id).status == "succeeded"

    # Flower shows the worker and its drain tasks; /metrics counts the work
    flower = stack["flower"]
    assert "e2e-gpu@" in httpx.get(f"{flower}/api/workers", auth=FLOWER_AUTH, timeout=10).text
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    tasks = httpx.get(f"{flower}/api/tasks", auth=FLOWER_AUTH, timeout=10).json()
    drains = [t for t in tasks.values() if t.get("name") == "lorry.drain"]
    assert drains and any(t.get("state") == "SUCCESS" for t in drains)
    api = stack["api"]
    n = len(jobs) + len(records)
    assert metric(api, "lorry_jobs", status="queued") == 0
    assert metric(api, "lorry_worker_jobs_total", outcome="succeeded") >= n
    assert metric(api, "lorry_worker_drain_tasks_total") >= 1
    assert metric(api, "lorry_worker_generated_tokens_total") > 0
    assert metric(api, "lorry_claim_latency_seconds_count") >= 1
    # the worker's KV pool: prompts looked up in the prefix cache, a pool of blocks
    assert metric(api, "lorry_prefix_cache_query_tokens_total") > 0
    assert metric(api, "lorry_kv_blocks_total") > 0
    # and its LoRA slot memory: rows, some held by the adapters the jobs used
    assert metric(api, "lorry_lora_slot_rows") >= metric(api, "lorry_lora_slot_rows_used") > 0
    assert metric(api, "lorry_lora_resident_adapters") >= 1


def test_cli_submit_and_status(stack, reference):
    key = create_tenant(stack, "cli-user")
    env = {**stack["env"], "LORRY_URL": stack["api"], "LORRY_API_KEY": key}
    text = run_cli(["submit", "Hello there", "--no-chat", "--max-tokens", "3", "--wait"], env)
    assert text.rstrip("\n") == reference(None, "Hello there", 3)[1]
    job_id = run_cli(["submit", "Hi", "--max-tokens", "2"], env).strip()
    assert job_id.startswith("job_")
    assert json.loads(run_cli(["status", job_id], env))["id"] == job_id


def _raw(api: str, request: bytes, wait: float) -> tuple[bytes, float, float | None]:
    """Send ``request`` on a socket of its own; read what comes back within ``wait`` ->
    (the bytes, seconds to the first of them, seconds until the server closed or None)."""
    import socket
    import time
    from urllib.parse import urlsplit

    u = urlsplit(api)
    got, first, closed = b"", None, None
    start = time.monotonic()
    with socket.create_connection((u.hostname, u.port), timeout=wait) as s:
        s.sendall(request)
        try:
            while chunk := s.recv(65536):
                got += chunk
                first = first or time.monotonic() - start
            closed = time.monotonic() - start
        except TimeoutError:
            pass
    return got, first, closed


def test_a_body_that_never_ends_does_not_hold_the_api(stack):
    """A chunked body whose end never comes: without a key it is refused before a byte is
    read; with one, 408 once no byte has come for LORRY_BODY_IDLE_SECONDS (3 s here); the
    connection is closed either way. The API held both for ever before (a hostile-tenant
    audit)."""
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n")
    first = b"\r\n5\r\n{\"pro\r\n"
    got, after, closed = _raw(stack["api"], head + first, 10)
    assert got.startswith(b"HTTP/1.1 401") and b"missing_api_key" in got, got[:300]
    assert after < 2 and closed is not None and closed < 2, (after, closed)
    key = create_tenant(stack, "slowpoke")
    got, after, closed = _raw(stack["api"], head + f"Authorization: Bearer {key}\r\n".encode()
                              + first, 10)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got, got[:300]
    assert 2.5 < after < 6 and closed is not None and closed < 6, (after, closed)
