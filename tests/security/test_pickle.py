"""A pickled adapter_model.bin carrying code is never unpickled: its registration is refused
from the pickle opcodes alone, the engine refuses it too, and the payload never runs."""
from __future__ import annotations

import os
import shutil
import zipfile

import pytest
import torch
from lorry.workers.drain import Drainer

from tests.security.conftest import counts


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def engine_for(settings):
    from lorry.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=settings.model, device="cpu", max_loras=2,
                                  max_lora_rank=16, max_cpu_loras=2, max_model_len=128))


def evil_adapter(good_dir, out_dir, marker) -> None:
    """The good adapter's config, its weights replaced by a torch-format .bin whose pickle
    holds the payload next to real tensors."""
    out_dir.mkdir()
    shutil.copy(good_dir / "adapter_config.json", out_dir / "adapter_config.json")
    from safetensors.torch import load_file

    tensors = load_file(str(good_dir / "adapter_model.safetensors"))
    torch.save({**tensors, "x": Payload(str(marker))}, str(out_dir / "adapter_model.bin"))
    assert zipfile.is_zipfile(out_dir / "adapter_model.bin")  # what torch.save writes


def test_pickled_bin_with_code_never_runs(service, alice, roots, tmp_path):
    _app, queue, settings, url = service
    root = roots[0]
    marker = tmp_path / "PWNED"
    evil = root / f"evil-{tmp_path.name}"
    evil_adapter(root / "good", evil, marker)

    before = counts(url)
    r = alice.post("/v1/adapters", json={"name": "evil", "source": str(evil)})
    assert not marker.exists()
    # The API has no torch: the pickle's opcodes are read (never run) and its import of
    # os.mkdir refuses the registration; nothing is stored.
    assert r.status_code == 422, r.text
    assert "adapter_model.bin" in r.text and "mkdir" in r.text, r.text
    assert counts(url) == before
    # the worker's engine refuses it by the same rule, and still never runs the payload
    from lorry.engine import LoRAError, LoRARequest

    eng = engine_for(settings)
    with pytest.raises(LoRAError, match="adapter_model.bin is a pickle that imports"):
        eng.add_lora(LoRARequest("evil", 99, str(evil)))
    assert not marker.exists()
    # a job naming it is refused too: the adapter was never registered
    r = alice.post("/v1/jobs", json={"prompt": "hi", "adapter": "evil",
                                     "sampling": {"max_tokens": 2}})
    assert r.status_code in (404, 422), r.text
    assert counts(url) == before
    assert not marker.exists()


def test_prompt_longer_than_max_model_len_is_refused_with_the_reason(service, alice):
    """The API counts the prompt with the base tokenizer: 422 naming count and limit, no row."""
    _app, queue, settings, url = service
    before = counts(url)
    # byte-level tiny tokenizer: 300 bytes + BOS; messages count a lower bound (content - 2)
    for body, count in (({"prompt": "z" * 300}, 301),
                        ({"messages": [{"role": "user", "content": "z" * 300}]}, 298)):
        r = alice.post("/v1/jobs", json={**body, "sampling": {"max_tokens": 2}})
        assert r.status_code == 422, r.text
        assert f"{count} tokens; max_model_len is 128" in r.json()["detail"], r.text
    assert counts(url) == before
    ok_job = alice.post("/v1/jobs", json={"prompt": "short", "sampling": {"max_tokens": 2}}).json()
    Drainer(queue, engine_for(settings), "sec-worker", max_num_seqs=4).run(max_seconds=60)
    assert alice.get(f"/v1/jobs/{ok_job['id']}").json()["status"] == "succeeded"


def test_batch_line_longer_than_max_model_len_is_a_line_error(service, alice):
    """A too-long batch line is reported on its line; the other lines are queued."""
    import json

    _app, _queue, _settings, url = service

    def line(cid, prompt):
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                           "body": {"model": "base", "prompt": prompt, "max_tokens": 2}})
    before = counts(url)
    r = alice.post("/v1/batches", content="\n".join([line("a", "short"), line("b", "z" * 300)]))
    assert r.status_code == 201, r.text
    [err] = r.json()["errors"]["data"]
    assert err["line"] == 2 and err["code"] == "context_length_exceeded", err
    assert "max_model_len is 128" in err["message"], err
    assert counts(url)["jobs"] == before["jobs"] + 1
    only_long = alice.post("/v1/batches", content=line("c", "z" * 300))
    assert only_long.status_code == 422 and "max_model_len" in only_long.text, only_long.text
