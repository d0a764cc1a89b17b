"""LRU order and eviction of the GPU slots and the CPU cache, pinning, and their counters."""
from __future__ import annotations

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRAError, LoRARequest, SamplingParams

SP = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def engine(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=16,
                                  max_cpu_loras=3))


@pytest.fixture()
def reqs(tiny_llama):
    return [LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(tiny_llama.adapters.items())]


def _use(engine, *requests):
    for r in requests:
        engine.generate("x", SP, r, use_tqdm=False)


def test_gpu_and_cpu_lru_order_and_eviction(engine, reqs):
    a, b, c, d = reqs
    _use(engine, a, b)
    assert engine.list_loras()["gpu"] == [1, 2]
    _use(engine, a)  # a becomes most recent
    assert engine.list_loras()["gpu"] == [2, 1]
    _use(engine, c)  # evicts b from the GPU (LRU), b stays warm on the CPU
    assert engine.list_loras() == {"gpu": [1, 3], "cpu": [2, 1, 3], "pinned": []}
    _use(engine, d)  # evicts a from the GPU and b (LRU) from the CPU
    assert engine.list_loras()["gpu"] == [3, 4]
    assert engine.list_loras()["cpu"] == [1, 3, 4]
    stats = engine.cache_stats()
    assert stats["gpu"]["evictions"] == 2 and stats["cpu"]["evictions"] == 1
    assert stats["gpu"]["residents"] == 2 and stats["cpu"]["residents"] == 3
    assert stats["gpu"]["misses"] == 4 and stats["gpu"]["hits"] == 1
    assert stats["cpu"]["misses"] == 4 and stats["cpu"]["load_seconds"] > 0
    _use(engine, b)  # a cold reload from disk: a CPU miss
    assert engine.cache_stats()["cpu"]["misses"] == 5


def test_pinned_adapter_survives_eviction(engine, reqs):
    a, b, c, d = reqs
    engine.add_lora(a)
    engine.pin_lora(a.lora_int_id)
    assert engine.list_loras()["gpu"] == [1] and engine.list_loras()["pinned"] == [1]
    _use(engine, b, c, d, b, c)
    assert 1 in engine.list_loras()["gpu"] and 1 in engine.list_loras()["cpu"]
    engine.unpin_lora(1)
    _use(engine, d, c)
    assert 1 not in engine.list_loras()["gpu"]


def test_pinning_every_slot_refuses_other_adapters(engine, reqs):
    a, b, c, _ = reqs
    for r in (a, b):
        engine.add_lora(r)
        engine.pin_lora(r.lora_int_id)
    engine.add_lora(c)
    with pytest.raises(LoRAError, match="max_loras=2 GPU slots are pinned"):
        engine.pin_lora(c.lora_int_id)
    with pytest.raises(LoRAError, match="pinned"):
        engine.generate("x", SP, c, use_tqdm=False)
    _use(engine, a, b)  # pinned adapters still serve
    with pytest.raises(LoRAError, match="not loaded"):
        engine.pin_lora(99)


def test_remove_lora_frees_both_levels(engine, reqs):
    _use(engine, reqs[0])
    assert engine.remove_lora(1) is True
    assert engine.list_loras() == {"gpu": [], "cpu": [], "pinned": []}
    assert engine.remove_lora(1) is False


def test_remove_refused_while_requests_use_it(engine, reqs):
    engine.add_request("r1", "hello", SP, reqs[0])
    with pytest.raises(LoRAError, match="unfinished requests"):
        engine.remove_lora(1)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.remove_lora(1)


def test_registering_adapters_adds_no_slot_memory(engine, reqs):
    layer = engine.model.layers[0].self_attn.qkv_proj
    ptrs = [t.data_ptr() for t in layer.lora_a + layer.lora_b]
    _use(engine, *reqs)
    assert [t.data_ptr() for t in layer.lora_a + layer.lora_b] == ptrs
    assert layer.lora_a[0].shape[0] == 2 * engine.config.max_lora_rank  # max_loras slots' rows
