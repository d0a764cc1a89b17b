"""`lorry run FILE.jsonl -o OUT.jsonl`: the embedded default (SQLite + in-process worker)."""
from __future__ import annotations

import json
import os
import subprocess

from procs import LORRY


def test_lorry_run_writes_openai_lines_equal_to_the_engine(tiny, tmp_path):
    root, model, adapters = tiny
    records = [{"custom_id": f"{m}-{i}", "method": "POST", "url": url,
                "body": {"model": m, **({"prompt": p} if url == "/v1/completions" else
                                        {"messages": [{"role": "user", "content": p}]}),
                         "max_tokens": 4, "temperature": 0}}
               for i, (p, url) in enumerate([("alpha beta", "/v1/completions"),
                                             ("gamma", "/v1/chat/completions")])
               for m in ("alpha", "beta", "tiny-llama")]
    src = tmp_path / "in.jsonl"
    ghost = {"custom_id": "ghost-1", "method": "POST", "url": "/v1/completions",
             "body": {"model": "ghost", "prompt": "boo"}}
    src.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n"
                   + json.dumps(ghost) + "\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "LORRY_MODEL": str(model), "LORRY_DEVICE": "cpu",
           "LORRY_MAX_LORA_RANK": "16", "LORRY_MAX_NUM_SEQS": "4", "LORRY_MAX_MODEL_LEN": "128",
           "LORRY_MAX_LORAS": "2", "LORRY_MAX_CPU_LORAS": "2"}
    args = ["run", str(src), "-o", str(out)] + [f"--adapter={n}={p}" for n, p in adapters.items()]
    proc = subprocess.run(LORRY + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # one bad line: reported, exit status 1
    assert "line 7 is not valid JSON" in proc.stderr
    assert "6 succeeded, 2 failed" in proc.stdout
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [(e["error"]["line"], e["custom_id"]) for e in errors] == [(7, None), (8, "ghost-1")]

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", max_loras=2, max_lora_rank=16,
                                 max_num_seqs=4, max_model_len=128))
    loras = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(adapters.items())}
    lines = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert sorted(lines) == sorted(r["custom_id"] for r in records)
    for r in records:
        body = r["body"]
        prompt = body.get("prompt") or body["messages"]
        [want] = eng.generate([prompt], SamplingParams(max_tokens=4, temperature=0),
                              lora_request=[loras.get(body["model"])], use_tqdm=False)
        resp = lines[r["custom_id"]]["response"]
        choice = resp["body"]["choices"][0]
        got = choice["text"] if "text" in choice else choice["message"]["content"]
        want_text = want.outputs[0].text.replace("\x00", "\ufffd")  # as the worker stores it
        assert resp["status_code"] == 200 and got == want_text, r["custom_id"]


def test_lorry_run_refuses_a_bad_adapter_before_running(tiny, tmp_path):
    _, model, _ = tiny
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "tiny-llama", "prompt": "x"}}) + "\n")
    env = {**os.environ, "LORRY_MODEL": str(model), "LORRY_DEVICE": "cpu"}
    proc = subprocess.run(LORRY + ["run", str(src), "-o", str(tmp_path / "out.jsonl"),
                                   f"--adapter=ghost={tmp_path / 'nowhere'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "adapter_config.json not found" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_lorry_run_names_an_adapters_dir_that_is_missing_or_empty(tiny, tmp_path):
    """Run from a directory where --adapters-dir does not exist (or holds no adapter): exit 2
    naming it, before any line runs (not every line refused as an unknown model)."""
    _, model, _ = tiny
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "tiny-llama", "prompt": "x"}}) + "\n")
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "LORRY_MODEL": str(model), "LORRY_DEVICE": "cpu"}
    for where, words in (("adapters/demo", "does not exist"), ("empty", "holds no PEFT adapter")):
        proc = subprocess.run(LORRY + ["run", str(src), "-o", "out.jsonl", "--adapters-dir",
                                       where], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert words in " ".join(proc.stderr.split()) and where in proc.stderr
        assert not (tmp_path / "out.jsonl").exists()


def test_lorry_run_with_the_prompt_hold_gives_the_engines_tokens(tiny, tmp_path):
    """LORRY_PREFILL_MIN_TOKENS (CUDA's default behaviour, set here on the CPU): the embedded
    worker's drain keeps a backlog in its holding engine; every line still gets the tokens
    of the engine alone."""
    _, model, adapters = tiny
    records = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": ("alpha", "beta", "tiny-llama")[i % 3],
                         "prompt": "word " * (2 + i % 5), "max_tokens": 2 + i % 6,
                         "temperature": 0}} for i in range(14)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "LORRY_MODEL": str(model), "LORRY_DEVICE": "cpu",
           "LORRY_MAX_LORA_RANK": "16", "LORRY_MAX_NUM_SEQS": "4", "LORRY_MAX_MODEL_LEN": "128",
           "LORRY_MAX_LORAS": "2", "LORRY_MAX_CPU_LORAS": "2",
           "LORRY_PREFILL_MIN_TOKENS": "30", "LORRY_PREFILL_MAX_WAIT": "4"}
    args = ["run", str(src), "-o", str(out)] + [f"--adapter={n}={p}" for n, p in adapters.items()]
    proc = subprocess.run(LORRY + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "14 succeeded" in proc.stdout

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", max_loras=2, max_lora_rank=16,
                                 max_num_seqs=4, max_model_len=128))
    loras = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(adapters.items())}
    lines = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    for r in records:
        body = r["body"]
        [want] = eng.generate([body["prompt"]], SamplingParams(max_tokens=body["max_tokens"],
                                                               temperature=0),
                              lora_request=[loras.get(body["model"])], use_tqdm=False)
        resp = lines[r["custom_id"]]["response"]
        want_text = want.outputs[0].text.replace("\x00", "\ufffd")
        assert resp["status_code"] == 200, r["custom_id"]
        assert resp["body"]["choices"][0]["text"] == want_text, r["custom_id"]
