"""Rows stop on every end-of-sequence id the model declares: generation_config.json may list
several (Llama-3 instruct: [128001, 128009]), as transformers' generate and vLLM stop on each."""
from __future__ import annotations

import json
import shutil

import torch

from lorry.engine import EngineConfig, LLMEngine, SamplingParams

PROMPTS = [[5, 9, 14, 3, 22, 7], [11, 4, 8, 30, 2]]


def _generate(model_dir, max_tokens=10, **params):
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", enable_lora=False,
                                    max_num_seqs=2, max_model_len=64))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                   **params), use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_every_listed_eos_id_stops_the_row_as_in_transformers(tiny_llama, tmp_path):
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_llama.dir, model_dir)
    free = [o.token_ids for o in _generate(model_dir, ignore_eos=True)]
    # the third token of the first row and the fifth of the second become end-of-sequence ids
    listed = [free[0][2], free[1][4]]
    cfg = model_dir / "generation_config.json"
    gen = json.loads(cfg.read_text()) if cfg.exists() else {}
    cfg.write_text(json.dumps({**gen, "eos_token_id": [tiny_llama.hf.config.eos_token_id,
                                                        *listed]}))
    outs = _generate(model_dir)
    for out, row in zip(outs, free):
        cut = next(i for i, t in enumerate(row) if t in listed) + 1
        assert out.token_ids == row[:cut] and out.finish_reason == "stop"
    with torch.no_grad():  # transformers' greedy generate with the same generation config
        for prompt, out in zip(PROMPTS, outs):
            ids = tiny_llama.hf.generate(torch.tensor([prompt]), max_new_tokens=10,
                                         do_sample=False,
                                         eos_token_id=[tiny_llama.hf.config.eos_token_id,
                                                       *listed], pad_token_id=0)
            assert ids[0, len(prompt):].tolist() == out.token_ids
    assert [o.token_ids for o in _generate(model_dir, ignore_eos=True)] == free
