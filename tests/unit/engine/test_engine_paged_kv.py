"""The paged KV cache: block tables, preemption (recompute) when the pool runs out, prefix
caching keyed by tokens AND adapter; greedy tokens equal PEFT's whatever the paging does."""
from __future__ import annotations

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.kv_cache import BlockManager
from lorry.engine.sequence import Sequence, SequenceStatus
from tests.unit.engine.conftest import peft_greedy

NAMES = ["qv_r8", "all_r4_rslora", "mlp_r16", "pattern"]
PREFIX = [11 + (5 * j) % 90 for j in range(37)]   # a shared "template" of 37 tokens


def _engine(base, **kw):
    cfg = {"max_loras": 4, "max_lora_rank": 16, "max_num_seqs": 8, "max_model_len": 96,
           "device": "cpu", "dtype": "float32", **kw}
    return LLMEngine(EngineConfig(model=str(base.dir), **cfg))


def _workload(base, n=12, more=0):
    """Prompts of unequal lengths, half starting with PREFIX; adapters mixed with base rows."""
    reqs = [LoRARequest(name, i + 1, str(base.adapters[name])) for i, name in enumerate(NAMES)]
    prompts, loras, params = [], [], []
    for i in range(n):
        tail = [3 + (7 * i + j) % 200 for j in range(3 + 5 * (i % 4))]
        prompts.append(PREFIX + tail if i % 2 else tail)
        loras.append(reqs[i % 4] if i % 3 else None)
        params.append(SamplingParams(max_tokens=6 + 4 * (i % 3) + more, temperature=0.0,
                                     ignore_eos=True))
    return prompts, loras, params


def _run(eng, base, n=12, more=0):
    prompts, loras, params = _workload(base, n, more)
    outs = eng.generate(prompts, params, loras, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_pool_preempts_and_still_gives_pefts_tokens(tiny_llama, device, mixed):
    """A pool of 12 blocks of 8 tokens (one sequence of max_model_len needs 12) for 8 rows:
    decode steps run out of blocks, the newest sequences are preempted and recomputed,
    chunked prefill splits the prompts (in mixed steps with the decoding rows, or in steps
    of their own), and every row still equals PEFT's greedy tokens."""
    eng = _engine(tiny_llama, block_size=8, num_kv_blocks=13, max_num_batched_tokens=24,
                  device=device, mixed_steps=mixed)   # CUDA: graphs, Triton attention
    for lr in dict.fromkeys(lr for lr in _workload(tiny_llama)[1] if lr):  # loaded now, not
        eng.add_lora(lr)                                      # in the background: a fixed order
    tokens, outs = _run(eng, tiny_llama, more=20)   # answers long enough to fill the pool
    stats = eng.cache_stats()["kv"]
    assert stats["preemptions"] >= 1
    assert (eng.cache_stats()["steps"]["prefill"]["mixed"] > 0) == mixed
    assert stats["blocks_free"] == stats["blocks_total"]        # every block came back
    peft = tiny_llama.peft()
    for out, got in zip(outs, tokens):
        name = out.lora_request.lora_name if out.lora_request else None
        want, _ = peft_greedy(peft, out.prompt_token_ids, len(got), name)
        assert got == want, f"row {out.request_id} (adapter {name})"


@pytest.mark.parametrize("device", DEVICES)
def test_paging_prefix_caching_and_block_size_do_not_change_tokens(tiny_llama, device):
    ref, _ = _run(_engine(tiny_llama, enable_prefix_caching=False, block_size=16), tiny_llama)
    for kw in ({"block_size": 1}, {"block_size": 8}, {"block_size": 16},
               {"block_size": 8, "max_num_batched_tokens": 16}):
        eng = _engine(tiny_llama, device=device, **kw)
        got, _ = _run(eng, tiny_llama)
        assert got == ref, kw
        assert eng.cache_stats()["kv"]["prefix_hit_tokens"] > 0, kw   # PREFIX was shared


def test_prefix_blocks_are_shared_only_under_the_same_adapter(tiny_llama):
    eng = _engine(tiny_llama, block_size=8)
    a = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    b = LoRARequest("mlp_r16", 2, str(tiny_llama.adapters["mlp_r16"]))
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def hits(prompt, lora):
        before = eng.cache_stats()["kv"]["prefix_hit_tokens"]
        out = eng.generate([prompt], sp, lora, use_tqdm=False)[0]
        return eng.cache_stats()["kv"]["prefix_hit_tokens"] - before, out.outputs[0].token_ids

    prompt = PREFIX + [5, 6, 7]                       # 40 tokens: 4 full blocks of 8 hashable
    assert hits(prompt, a)[0] == 0
    assert hits(prompt, a)[0] == 32                   # same adapter: the 4 full blocks
    assert hits(prompt, b)[0] == 0                    # same tokens, other adapter: nothing
    assert hits(prompt, None)[0] == 0                 # nor the base
    assert hits(prompt[:20] + [9] * 20, a)[0] == 16   # a shared head: its full blocks only
    # the adapter dropped (its files may have changed in place): its old KV is never reused
    eng.remove_lora(1)
    n, tokens = hits(prompt, a)
    assert n == 0
    assert tokens == hits(prompt, a)[1]


def test_outputs_count_the_prompt_tokens_served_from_the_prefix_cache(tiny_llama):
    """num_cached_tokens (and usage's prompt_tokens_details.cached_tokens): the full blocks
    of the prompt that an earlier request of the same adapter computed, else 0."""
    eng = _engine(tiny_llama, block_size=8)
    a = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    b = LoRARequest("mlp_r16", 2, str(tiny_llama.adapters["mlp_r16"]))
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def cached(prompt, lora):
        out = eng.generate([prompt], sp, lora, use_tqdm=False)[0]
        assert out.usage["prompt_tokens_details"] == {"cached_tokens": out.num_cached_tokens}
        return out.num_cached_tokens

    assert cached(PREFIX + [5, 6, 7], a) == 0           # the first computes everything
    assert cached(PREFIX + [40, 41, 42, 43], a) == 32   # 37 shared tokens: 4 full blocks
    assert cached(PREFIX + [5, 6, 7], b) == 0           # other adapter: nothing
    first, second = eng.generate([[9] * 20 + [1], [9] * 20 + [2]], sp, a, use_tqdm=False)
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 16)   # in one step
    assert first.usage == {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24,
                           "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_recomputed_sequence_does_not_count_its_own_blocks_as_cached(tiny_llama):
    """A preempted sequence finds the prompt blocks it computed itself in the cache when it
    is prefilled again: only what its first prefill found there counts."""
    eng = _engine(tiny_llama, block_size=8, num_kv_blocks=13)   # 12 blocks: room for one

    def sp(n):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    eng.generate([PREFIX[:16] + [200, 201, 202]], sp(2), use_tqdm=False)   # caches 2 blocks
    before = eng.cache_stats()["kv"]
    first = [150 + j % 40 for j in range(17)]           # admitted first (longest answer)
    newest = PREFIX[:16] + [3 + j for j in range(9)]    # 3 full blocks, the first 2 cached
    outs = eng.generate([first, newest], [sp(50), sp(40)], use_tqdm=False)
    kv = eng.cache_stats()["kv"]
    assert kv["preemptions"] > before["preemptions"]
    assert [o.num_cached_tokens for o in outs] == [0, 16]
    # its prefill again hit its own third block too (24), which is not counted
    assert kv["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 16 + 24


def test_block_manager_reuses_refcounts_and_evicts_least_recent():
    def seq(tokens, key=b""):
        s = Sequence("r", None, tokens, SamplingParams(), None, None, adapter_key=key)
        s.prefill_len = len(tokens)
        return s

    bm = BlockManager(num_blocks=7, block_size=4)       # 6 usable blocks
    a = seq(list(range(12)))                            # 3 blocks; 2 hashable (11 // 4)
    assert bm.allocate(a) and a.num_computed_tokens == 0 and 0 not in a.block_table
    bm.register(a, 12)
    b = seq(list(range(12)) + [99])                     # shares a's first 3 blocks' tokens
    assert bm.allocate(b) and b.block_table[:3] == a.block_table and b.num_computed_tokens == 12
    assert bm.ref[a.block_table[0]] == 2 and bm.num_free() == 2
    assert not bm.allocate(seq(list(range(50, 62))))    # 3 more blocks: only 2 free
    bm.release(b)
    bm.release(a)
    assert bm.num_free() == 6 and bm.stats()["blocks_cached"] == 3
    c = seq(list(range(100, 124)))                      # 6 blocks: evicts every cached one
    assert bm.allocate(c) and bm.stats()["blocks_cached"] == 0
    bm.release(c)
    d = seq(list(range(12)) + [1])
    assert bm.allocate(d) and d.num_computed_tokens == 0   # evicted: no stale hit


def test_a_pool_smaller_than_one_sequence_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="fewer than one sequence of max_model_len=96"):
        _engine(tiny_llama, block_size=16, num_kv_blocks=5)
    with pytest.raises(ValueError, match="block_size=12 is invalid"):
        EngineConfig(model="m", block_size=12)
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5 is invalid"):
        EngineConfig(model="m", gpu_memory_utilization=1.5)


def test_cache_stats_report_kv_and_steps(tiny_llama):
    eng = _engine(tiny_llama, block_size=16, max_num_seqs=4)
    _run(eng, tiny_llama, n=6)
    s = eng.cache_stats()
    assert s["kv"]["blocks_total"] == 4 * 6 and s["kv"]["peak_running"] == 4
    assert 0 < s["kv"]["prefix_hit_rate"] < 1
    assert s["steps"]["decode"]["max_batch"] == 4
    assert s["steps"]["prefill"]["tokens"] + s["kv"]["prefix_hit_tokens"] \
        == s["kv"]["prefix_query_tokens"]


def test_a_failed_prefill_leaves_no_cached_prefix(tiny_llama):
    """A step that fails after its blocks were registered must not let a later request
    reuse them (they hold no keys)."""
    eng = _engine(tiny_llama, block_size=8)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = PREFIX + [5, 6, 7]
    real = eng.runner.prefill

    def boom(*a, **k):
        raise RuntimeError("device lost")
    eng.runner.prefill = boom
    eng.add_request("r1", prompt, sp)
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    eng.abort_request("r1")
    eng.runner.prefill = real
    kv = eng.cache_stats()["kv"]
    assert kv["blocks_cached"] == 0 and kv["blocks_free"] == kv["blocks_total"]
    before = eng.cache_stats()["kv"]["prefix_hit_tokens"]
    out = eng.generate([prompt], sp, use_tqdm=False)[0]
    assert eng.cache_stats()["kv"]["prefix_hit_tokens"] == before
    want, _ = peft_greedy(tiny_llama.hf, out.prompt_token_ids, 2, None)
    assert out.outputs[0].token_ids == want


def test_512_rows_decode_together_with_the_tokens_of_a_small_batch(tiny_llama):
    """max_num_seqs=512: 600 requests, 512 decoding at once (the pool sized for them), each
    row the tokens it gets in batches of 8."""
    prompts = [[5 + i % 50, 6, 7, 8 + i % 9] for i in range(600)]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    big = _engine(tiny_llama, max_num_seqs=512, max_model_len=32, max_num_batched_tokens=4096)
    got = [o.outputs[0].token_ids for o in big.generate(prompts, sp, use_tqdm=False)]
    small = _engine(tiny_llama, max_num_seqs=8, max_model_len=32)
    want = [o.outputs[0].token_ids for o in small.generate(prompts[:40], sp, use_tqdm=False)]
    assert got[:40] == want
    stats = big.cache_stats()
    assert stats["kv"]["peak_running"] == 512 and stats["steps"]["decode"]["max_batch"] == 512


@pytest.mark.parametrize("fail_in", ["prefill", "slots"])
def test_a_failed_step_requeues_whoever_shared_its_fresh_blocks(tiny_llama, fail_in):
    """Two prompts with a common head admitted in one step, the second hitting blocks the
    first was to write; the step fails (in the model, or while placing adapters), the first
    is aborted: the second must not count those never-written blocks as computed."""
    prompt = [5 + (7 * j) % 200 for j in range(30)]
    other = prompt[:24] + [9, 8, 7]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = _engine(tiny_llama, block_size=8, enable_prefix_caching=False).generate(
        [other], sp, use_tqdm=False)[0].outputs[0].token_ids
    eng = _engine(tiny_llama, block_size=8)
    target = eng.runner if fail_in == "prefill" else eng
    name = "prefill" if fail_in == "prefill" else "_slots"
    real = getattr(target, name)

    def boom(*a, **k):
        setattr(target, name, real)
        raise RuntimeError("device lost")
    setattr(target, name, boom)
    eng.add_request("a", prompt, sp)
    eng.add_request("b", other, sp)
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    eng.abort_request("a")
    out = {}
    while eng.has_unfinished_requests():
        out.update({o.request_id: o for o in eng.step()})
    assert out["b"].outputs[0].token_ids == ref
    assert out["b"].num_cached_tokens == 0    # it computed every block itself in the end
    kv = eng.cache_stats()["kv"]
    assert kv["blocks_free"] == kv["blocks_total"] and kv["preemptions"] == 0


def test_chunk_padding_attends_to_real_keys_only(tmp_path):
    """Unpacked prefill (the comparison mode): a one-token chunk after a cached prefix batched
    with a long new prompt; the chunk's padding rows stay finite under a sliding window and
    soft-capping, so nothing NaN reaches the null block that padded tables read."""
    from transformers import Gemma2Config

    from lorry.testing import make_tiny_model

    cfg = Gemma2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=259, max_position_embeddings=256,
                       num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=7, attn_logit_softcapping=2.0)
    model = make_tiny_model(tmp_path / "g2", cfg)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = [3 + j % 50 for j in range(41)]
    second = [60 + j % 40 for j in range(20)]
    ref = LLMEngine(EngineConfig(model=str(model), device="cpu", block_size=8,
                                 max_model_len=96, enable_prefix_caching=False))
    want = [o.outputs[0].token_ids for o in ref.generate([first, second], sp, use_tqdm=False)]
    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", block_size=8, max_model_len=96))
    eng.runner.pack_prefill = False
    eng.generate([first], sp, use_tqdm=False)              # caches first's blocks
    got = [o.outputs[0].token_ids for o in eng.generate([first, second], sp, use_tqdm=False)]
    assert got == want
    assert all(torch.isfinite(layer.self_attn.v_cache[:8]).all() for layer in eng.model.layers)


def test_mixed_steps_give_the_tokens_of_alternating_steps(tiny_llama):
    """Prompt chunks riding in one step with the decoding rows (packed or padded prefill,
    prefix hits included) give the tokens of prefill and decode steps that alternate."""
    ref = _engine(tiny_llama, block_size=8, max_num_batched_tokens=16, mixed_steps=False)
    want, _ = _run(ref, tiny_llama, more=6)
    assert ref.cache_stats()["steps"]["prefill"]["mixed"] == 0
    for pack in (True, False):
        eng = _engine(tiny_llama, block_size=8, max_num_batched_tokens=16)
        eng.runner.pack_prefill = pack
        got, _ = _run(eng, tiny_llama, more=6)
        assert got == want, f"pack_prefill={pack}"
        stats = eng.cache_stats()
        assert stats["steps"]["prefill"]["mixed"] > 0 and stats["steps"]["prefill"]["rows"] > 0
        assert stats["kv"]["prefix_hit_tokens"] > 0
        # fewer steps: decode rows ride along instead of stepping on their own
        assert stats["steps"]["decode"]["steps"] < ref.cache_stats()["steps"]["decode"]["steps"]


def test_a_failed_mixed_step_requeues_its_prompts_and_keeps_its_decode_rows(tiny_llama):
    eng = _engine(tiny_llama, block_size=8, max_num_batched_tokens=16)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = {"a": [5, 6, 7], "b": PREFIX + [9]}
    eng.add_request("a", prompts["a"], sp)
    eng.step()                                  # a's prefill: a decodes from now on
    eng.add_request("b", prompts["b"], sp)
    real, seen = eng.runner.prefill, []

    def boom(seqs, slots, chunks=None):
        seen.append(([s.request_id for s in seqs], list(chunks)))
        raise RuntimeError("device lost")
    eng.runner.prefill = boom
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    assert seen == [(["b", "a"], [15])]   # b's first chunk (16 - 1 decode row), then a
    a, b = eng._seqs["a"], eng._seqs["b"]
    assert a.status is SequenceStatus.RUNNING and len(a.output_token_ids) == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert eng.cache_stats()["kv"]["blocks_cached"] == 0   # b's digests forgotten
    eng.runner.prefill = real
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
    for rid, prompt in prompts.items():
        want, _ = peft_greedy(tiny_llama.hf, prompt, 6, None)
        assert outs[rid] == want, rid
