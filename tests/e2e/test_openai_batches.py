"""OpenAI's Files, Batches and Models through the official `openai` SDK against the real API,
Celery worker and beat (the batch is finalized by beat's maintain)."""
from __future__ import annotations

import json
import subprocess
import time

import openai
import pytest
from procs import LORRY, run_cli

from lorry.client import Client
from tests.e2e.conftest import create_tenant

PROMPTS = ["The quick brown fox", "Lorry carries"]


@pytest.fixture(scope="module")
def reference(stack):
    """The engine in this process: what each chat request gives alone (greedy)."""
    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(stack["model"]), device="cpu", max_loras=2,
                                 max_lora_rank=16, max_cpu_loras=4, max_num_seqs=4,
                                 max_model_len=128))

    def alone(adapter, content, max_tokens):
        lora = None if adapter is None else LoRARequest(adapter.name, adapter.id, adapter.source)
        [out] = eng.generate([[{"role": "user", "content": content}]],
                             SamplingParams(max_tokens=max_tokens, temperature=0),
                             lora_request=[lora], use_tqdm=False)
        return out.outputs[0].text.replace("\x00", "\ufffd")
    return alone


@pytest.fixture(scope="module")
def tenant(stack):
    """(openai client, Lorry client, tenant name) with the adapters alpha and beta."""
    key = create_tenant(stack, "sdk-user")
    lorry = Client(stack["api"], key, timeout=30)
    adapters = {n: lorry.add_adapter(n, str(p)) for n, p in stack["adapters"].items()}
    sdk = openai.OpenAI(base_url=f"{stack['api']}/v1", api_key=key, max_retries=0)
    yield sdk, lorry, adapters
    lorry.close()
    sdk.close()


def request(cid: str, model: str, content: str) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 4, "temperature": 0,
                     "messages": [{"role": "user", "content": content}]}}


def wait_final(sdk, batch_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.5)


def test_sdk_files_batch_output_and_errors(stack, tenant, reference):
    sdk, _, adapters = tenant
    records = [request(f"{model}-{i}", model, p) for i, p in enumerate(PROMPTS)
               for model in ("tiny-llama", "alpha", "beta")]
    bad = request("ghost-1", "no-such-adapter", "hello")
    content = "".join(json.dumps(r) + "\n" for r in [*records, bad]).encode()
    upload = sdk.files.create(file=("nightly.jsonl", content), purpose="batch")
    assert upload.bytes == len(content) and upload.purpose == "batch"
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "in_progress" and batch.request_counts.total == len(records) + 1
    [refused] = sdk.batches.retrieve(batch.id).errors.data
    assert refused.line == len(records) + 1 and refused.code == "model_not_found"

    done = wait_final(sdk, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (len(records), 1)
    assert done.completed_at >= done.in_progress_at >= done.created_at
    out = [json.loads(x) for x in sdk.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(r["custom_id"] for r in records)
    for line in out:
        model, i = line["custom_id"].rsplit("-", 1)
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["model"] == model
        want = reference(adapters.get(model), PROMPTS[int(i)], 4)
        assert body["choices"][0]["message"]["content"] == want, line["custom_id"]
    # Batch.usage: what the output lines' usage sums to (the SDK's BatchUsage)
    assert done.usage.output_tokens == sum(x["response"]["body"]["usage"]["completion_tokens"]
                                           for x in out) >= len(records)
    assert done.usage.input_tokens == sum(x["response"]["body"]["usage"]["prompt_tokens"]
                                          for x in out)
    cached = [x["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for x in out]
    assert done.usage.input_tokens_details.cached_tokens == sum(cached)
    assert all(0 <= c <= x["response"]["body"]["usage"]["prompt_tokens"]
               for c, x in zip(cached, out))
    assert done.model == "tiny-llama"
    errors = [json.loads(x) for x in sdk.files.content(done.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("ghost-1", "model_not_found")]
    assert sdk.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_sdk_lists_models_and_pages_batches(stack, tenant):
    sdk, *_ = tenant
    models = {m.id: m.owned_by for m in sdk.models.list()}
    assert models == {"tiny-llama": "lorry", "alpha": "sdk-user", "beta": "sdk-user"}
    upload = sdk.files.create(file=("one.jsonl", json.dumps(request("x", "alpha", "hi")) + "\n"),
                              purpose="batch")
    made = [sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                               completion_window="24h").id for _ in range(3)]
    first = sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    seen = [b.id for b in sdk.batches.list(limit=2)]  # the SDK follows the cursor
    assert seen[:3] == made[::-1] and len(seen) == len(set(seen))


def test_sdk_reads_lorrys_errors(stack, tenant):
    sdk, *_ = tenant
    upload = sdk.files.create(file=("mine.jsonl", b"{}\n"), purpose="batch")
    other = openai.OpenAI(base_url=f"{stack['api']}/v1", max_retries=0,
                          api_key=create_tenant(stack, "someone-else"))
    with pytest.raises(openai.NotFoundError) as e:
        other.files.content(upload.id)
    assert e.value.body["message"] == f"no file {upload.id!r}"
    assert e.value.code == "file_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert "purpose 'fine-tune' is not supported" in e.value.message


def test_cli_batch_submit_wait_and_download(stack, tenant, tmp_path):
    _, lorry, _ = tenant
    key = lorry._http.headers["Authorization"].split(" ", 1)[1]
    env = {**stack["env"], "LORRY_URL": stack["api"], "LORRY_API_KEY": key}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(request("c1", "beta", "hi")) + "\n"
                   + json.dumps(request("c2", "missing", "hi")) + "\n")
    out = run_cli(["batch", "submit", str(src), "--wait"], env)
    batch_id = next(w for w in out.split() if w.startswith("batch_"))
    assert "completed: 1 completed, 1 failed of 2" in out
    status = json.loads(run_cli(["batch", "status", batch_id], env))
    assert status["status"] == "completed" and status["errors"]["data"][0]["custom_id"] == "c2"
    target = tmp_path / "out.jsonl"
    run_cli(["batch", "download", batch_id, "-o", str(target)], env)
    assert [json.loads(x)["custom_id"] for x in target.read_text().splitlines()] == ["c1"]
    errs = (tmp_path / "out.errors.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in errs] == ["c2"]
    # a batch with no valid line ends failed: --wait says so and exits 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n" + json.dumps(request("c3", "missing", "hi")) + "\n")
    proc = subprocess.run(LORRY + ["batch", "submit", str(bad), "--wait"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert " failed: 0 completed, 2 failed of 2" in proc.stdout
    # its download to the same path leaves no output file of the first batch beside its errors
    failed_id = next(w for w in proc.stdout.split() if w.startswith("batch_"))
    run_cli(["batch", "download", failed_id, "-o", str(target)], env)
    assert not target.exists()
    assert len((tmp_path / "out.errors.jsonl").read_text().splitlines()) == 2
    # a path it cannot write: a clear error (exit 2) before anything is fetched
    proc = subprocess.run(LORRY + ["batch", "download", batch_id, "-o",
                                   str(tmp_path / "missing" / "o.jsonl")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
