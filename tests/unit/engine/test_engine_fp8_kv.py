"""EngineConfig.kv_cache_dtype="fp8": keys and values kept in float8 e4m3 (CPU torch paths;
the Triton kernels' conversions are tests/kernels' and the CUDA rows here)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lorry.engine import EngineConfig
from lorry.engine.setup import kv_cache_dtype
from tests.unit.engine.test_engine_paged_kv import DEVICES, _engine, _run, _workload

FP8 = torch.float8_e4m3fn


class _Fp8Keys(DynamicCache):
    """A fresh cache per forward whose keys and values come back rounded to e4m3: PEFT's
    attention then sees what an fp8 KV cache holds (the first prefill's keys included)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.to(FP8).to(key_states.dtype),
                              value_states.to(FP8).to(value_states.dtype), layer_idx,
                              *args, **kwargs)


def _peft_greedy(model, prompt_ids, n, adapter, fp8):
    ids, logits = list(prompt_ids), []
    kw = {"adapter_names": [adapter or "__base__"]}
    with torch.no_grad():
        for _ in range(n):
            extra = {"past_key_values": _Fp8Keys(), "use_cache": True} if fp8 else {}
            row = model(torch.tensor([ids]), **kw, **extra).logits[0, -1]
            logits.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt_ids):], torch.stack(logits)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cache_gives_pefts_tokens_over_fp8_keys_through_preemption_and_chunks(
        tiny_llama, device):
    """Mixed adapters, a pool too small for the rows (preemption and recompute), prompts in
    chunks of 24 tokens: every row equals PEFT's greedy tokens when PEFT's attention reads
    keys and values rounded to e4m3, and the rounding is real (PEFT's logits over full
    precision keys differ)."""
    eng = _engine(tiny_llama, block_size=8, num_kv_blocks=13, max_num_batched_tokens=24,
                  device=device, kv_cache_dtype="fp8")
    assert eng.info()["kv_cache_dtype"] == "float8_e4m3fn"
    assert eng.model.layers[0].self_attn.k_cache.dtype == FP8
    for lr in dict.fromkeys(lr for lr in _workload(tiny_llama)[1] if lr):
        eng.add_lora(lr)
    tokens, outs = _run(eng, tiny_llama, more=20)
    assert eng.cache_stats()["kv"]["preemptions"] >= 1
    peft = tiny_llama.peft()
    gap = 0.0
    for out, got in zip(outs, tokens):
        name = out.lora_request.lora_name if out.lora_request else None
        want, fp8_logits = _peft_greedy(peft, out.prompt_token_ids, len(got), name, fp8=True)
        assert got == want, f"row {out.request_id} (adapter {name})"
        _, full = _peft_greedy(peft, out.prompt_token_ids, 1, name, fp8=False)
        gap = max(gap, float((full[0] - fp8_logits[0]).abs().max()))
    assert gap > 1e-3        # keys rounded to 3 mantissa bits move the logits


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_caching_block_size_and_chunks_do_not_change_fp8_tokens(tiny_llama, device):
    ref, _ = _run(_engine(tiny_llama, enable_prefix_caching=False, kv_cache_dtype="fp8"),
                  tiny_llama)
    for kw in ({"block_size": 8}, {"block_size": 16, "max_num_batched_tokens": 16},
               {"mixed_steps": False}):
        eng = _engine(tiny_llama, device=device, kv_cache_dtype="fp8", **kw)
        got, _ = _run(eng, tiny_llama)
        assert got == ref, kw
        assert eng.cache_stats()["kv"]["prefix_hit_tokens"] > 0, kw   # PREFIX was shared


def test_an_fp8_block_takes_a_quarter_of_an_fp32_one_and_a_half_of_a_bf16_one(tiny_llama):
    eng = _engine(tiny_llama, kv_cache_dtype="fp8")
    m = eng.model
    assert m.kv_block_bytes(16, FP8) * 4 == m.kv_block_bytes(16)        # fp32 model
    assert m.kv_block_bytes(16, FP8) * 2 == m.kv_block_bytes(16, torch.bfloat16)
    a = m.layers[0].self_attn
    assert a.k_cache.element_size() == a.v_cache.element_size() == 1


def test_kv_cache_dtype_is_checked(tiny_llama, monkeypatch):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' is invalid: allowed \['auto', "):
        EngineConfig(model=str(tiny_llama.dir), kv_cache_dtype="int8")
    assert kv_cache_dtype("auto", torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert kv_cache_dtype("fp8_e4m3", torch.float32, torch.device("cpu")) == FP8
    # an A100 (8.0) has no fp8 conversions: refused before any weight is read
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability 8.9 or newer.*is 8.0"):
        kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda")) == FP8
