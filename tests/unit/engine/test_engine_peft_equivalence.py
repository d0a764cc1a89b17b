"""Mixed-adapter batches give PEFT's greedy tokens and logits, row by row."""
from __future__ import annotations

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from tests.unit.engine import conftest
from tests.unit.engine.conftest import SMOLLM2, peft_greedy

PROMPTS = ["Hello there", "a", "The quick brown fox jumps", "xyz 123", "!", "multi lora",
           "zz top", "long prompt " * 3]


def _requests(base):
    return {name: LoRARequest(name, i + 1, str(path))
            for i, (name, path) in enumerate(base.adapters.items())}


def _mixed_batch(base, names):
    reqs = _requests(base)
    return [reqs[n] if n else None for n in names]


def run_and_compare(base, names, *, max_loras, max_tokens=5, prompts=PROMPTS, rank=16):
    eng = LLMEngine(EngineConfig(model=str(base.dir), max_loras=max_loras, max_lora_rank=rank,
                                 max_cpu_loras=8, max_num_seqs=8, max_model_len=128))
    captured = {}

    def hook(seqs, logits):
        for s, row in zip(seqs, logits):
            captured.setdefault(s.request_id, []).append(row.clone())

    eng.runner.logits_hook = hook
    loras = _mixed_batch(base, names)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = eng.generate(prompts[:len(names)], sp, loras, use_tqdm=False)
    peft = base.peft()
    for out, name in zip(outs, names):
        tokens, logits = peft_greedy(peft, out.prompt_token_ids, max_tokens, name)
        assert out.outputs[0].token_ids == tokens, f"row with adapter {name}"
        ours = torch.stack(captured[out.request_id])
        torch.testing.assert_close(ours, logits, atol=1e-4, rtol=1e-4)
        assert out.lora_request == (loras[names.index(name)] if name else None)
    return eng, outs


NAMES = ["qv_r8", None, "all_r4_rslora", "mlp_r16", "pattern", "qv_r8", None, "pattern"]


def test_mixed_batch_matches_peft_on_gqa_llama(tiny_llama):
    _eng, outs = run_and_compare(tiny_llama, NAMES, max_loras=4)
    # the adapters matter: rows with an adapter differ from the base's tokens
    base_tokens = [peft_greedy(tiny_llama.hf, o.prompt_token_ids, 5, None)[0] for o in outs]
    assert sum(o.outputs[0].token_ids != b for o, b in zip(outs, base_tokens)) >= 4


def test_mixed_batch_matches_peft_on_qwen2_with_bias_and_tied_embeddings(tiny_qwen2):
    run_and_compare(tiny_qwen2, NAMES[:6], max_loras=4)


def test_more_adapters_than_slots_are_split_not_refused(tiny_llama):
    eng, _ = run_and_compare(tiny_llama, NAMES, max_loras=1, max_tokens=3)
    gpu = eng.cache_stats()["gpu"]
    assert gpu["capacity"] == 1 and gpu["evictions"] >= 3


def test_fan_in_fan_out_adapter_is_transposed(tiny_llama, tmp_path):
    """A checkpoint with transposed A/B and fan_in_fan_out=true serves like the original."""
    import json

    from safetensors.torch import load_file, save_file

    src = tiny_llama.adapters["pattern"]
    tensors = {k: v.t().contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8))
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    a = eng.generate(PROMPTS[:2], sp, LoRARequest("orig", 1, str(src)), use_tqdm=False)
    b = eng.generate(PROMPTS[:2], sp, LoRARequest("t", 2, str(tmp_path)), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(), reason="demo model not prepared")
def test_smollm2_mixed_batch_matches_peft(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from lorry.testing import write_random_adapter

    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(str(SMOLLM2), dtype=torch.float32).eval()
    a1 = write_random_adapter(tmp_path / "a1", cfg, r=8, seed=1, init_scale=0.02,
                              target_modules=conftest.ALL)
    a2 = write_random_adapter(tmp_path / "a2", cfg, r=4, lora_alpha=32, seed=2, init_scale=0.05,
                              target_modules=("q_proj", "v_proj"))
    from peft import PeftModel

    peft = PeftModel.from_pretrained(hf, str(a1), adapter_name="a1")
    peft.load_adapter(str(a2), adapter_name="a2")
    peft.eval()
    eng = LLMEngine(EngineConfig(model=str(SMOLLM2), max_loras=2, max_lora_rank=8,
                                 max_num_seqs=4, max_model_len=64))
    captured = {}
    eng.runner.logits_hook = lambda seqs, lg: [captured.setdefault(s.request_id, []).append(r)
                                               for s, r in zip(seqs, lg)]
    reqs = [LoRARequest("a1", 1, str(a1)), None, LoRARequest("a2", 2, str(a2))]
    prompts = ["What is the capital of France?", "Hi", "Write a haiku about"]
    outs = eng.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                        reqs, use_tqdm=False)
    for out, name in zip(outs, ["a1", None, "a2"]):
        tokens, logits = peft_greedy(peft, out.prompt_token_ids, 2, name)
        assert out.outputs[0].token_ids == tokens
        torch.testing.assert_close(torch.stack(captured[out.request_id]), logits,
                                   atol=1e-4, rtol=1e-4)
