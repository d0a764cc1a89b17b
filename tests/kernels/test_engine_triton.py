"""The engine with the Triton LoRA kernels matches PEFT on a mixed-adapter batch.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from lorry.kernels.backends import get_lora_ops
from lorry.testing import make_tiny_base_and_adapters

ADAPTERS = {  # name -> (rank, alpha, targets, rslora): different ranks, scalings and targets
    "qv8": (8, 16, ("q_proj", "v_proj"), False),
    "all4": (4, 8, "all-linear", True),
    "mlp16": (16, 8, ("gate_proj", "up_proj", "down_proj"), False),
}
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_base_and_adapters(
        tmp_path_factory.mktemp("engine_triton"), ADAPTERS, hidden_size=48, num_layers=1,
        num_heads=4, num_kv_heads=2, intermediate_size=80)


def _engine(base, device):
    from lorry.engine import EngineConfig, LLMEngine
    backend = "triton" if device.type == "cuda" else "torch"
    eng = LLMEngine(EngineConfig(model=str(base), dtype="float32", device=device.type,
                                 max_loras=4, max_lora_rank=16, max_cpu_loras=4,
                                 lora_backend=backend))
    if device.type == "cpu":
        # The engine only offers "triton" on CUDA; under the interpreter, swap the kernels in.
        eng.runner.ops = get_lora_ops("triton")
    return eng


def _peft_greedy(base, adapter, prompt: list[int], device):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model = model.to(device).eval()
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        first = model(ids).logits[0].float().cpu()
        for _ in range(NEW_TOKENS):      # plain greedy loop: no EOS handling to differ on
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return first, ids[0, len(prompt):].tolist()


def test_mixed_batch_matches_peft_with_triton_kernels(tiny, device):
    from lorry.engine import LoRARequest, SamplingParams
    base, paths = tiny
    eng = _engine(base, device)
    assert eng.runner.ops is get_lora_ops("triton")
    reqs = [LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(paths.items())]
    # Uneven prompts; rows with each adapter and without any, one adapter used twice.
    prompts = [[5, 9, 33, 70, 12], [40, 41], [7, 8, 9, 10, 11, 12, 13], [99, 3, 60], [17] * 4]
    loras = [reqs[0], None, reqs[1], reqs[2], reqs[0]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                ignore_eos=True),
                        lora_request=loras, use_tqdm=False)
    logits = eng.compute_logits(prompts, loras)
    for prompt, lr, out, got_logits in zip(prompts, loras, outs, logits):
        ref_logits, ref_tokens = _peft_greedy(base, paths[lr.lora_name] if lr else None,
                                              prompt, device)
        assert out.outputs[0].token_ids == ref_tokens
        torch.testing.assert_close(got_logits.float().cpu(), ref_logits, rtol=1e-4, atol=1e-4)


def test_folded_a_slots_match_peft(tiny, device, monkeypatch):
    # The A slots folded under the base weights (EngineConfig.lora_fold, CUDA decode): every
    # step's base matmul also yields each slot's x·Aᵀ and only the expand kernel runs.
    import dataclasses

    from lorry.engine import LoRARequest, SamplingParams
    from lorry.engine.lora import slot_layout
    from lorry.engine.lora.gpu_slots import GPUSlotManager
    monkeypatch.setattr(slot_layout, "FOLD_MAX_EXTRA", 100.0)   # tiny layers: fold them all
    base, paths = tiny
    eng = _engine(base, device)
    weights = {k: m.weight.clone() for k, m in eng.model.named_modules()
               if hasattr(m, "lora_ext")}
    eng.loras.gpu = GPUSlotManager(eng.model, 4, 16, torch.float32, device, fold=True)
    # as engine.setup wires a manager: its pinned-allocation lock is held around graph
    # captures (a background adapter load pinning memory mid-capture invalidates it)
    eng.runner.graph_lock = eng.loras.gpu.layout.pin_lock
    # and where its adapters lie in its row buffers, and what fits in them
    eng.runner.slot_rows = eng.loras.gpu.rows
    if eng.runner.graphs is not None:
        eng.runner.graphs.slot_rows = eng.loras.gpu.rows
    eng.scheduler.slot_memory = eng.loras.gpu
    assert all(isinstance(a, slot_layout.FoldedA) for a, _ in eng.loras.gpu.buffers.values())
    for k, m in eng.model.named_modules():     # the base weights moved, unchanged
        if k in weights:
            assert m.lora_ext is not None and torch.equal(m.weight, weights[k])
            assert m.weight.data_ptr() == m.lora_ext.data_ptr()
    lora_step = type(eng.runner)._lora
    monkeypatch.setattr(eng.runner, "_lora", lambda slots: None if (
        st := lora_step(eng.runner, slots)) is None else dataclasses.replace(st, fold=True))
    ops, calls = eng.runner.ops, []
    folded = ops.add_lora_folded
    monkeypatch.setattr(ops, "add_lora_folded", lambda *a, **k: calls.append(1) or folded(*a, **k))
    reqs = [LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(paths.items())]
    prompts = [[5, 9, 33, 70, 12], [40, 41], [7, 8, 9, 10], [99, 3, 60]]
    loras = [reqs[0], None, reqs[1], reqs[2]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                ignore_eos=True),
                        lora_request=loras, use_tqdm=False)
    for prompt, lr, out in zip(prompts, loras, outs):
        _, ref_tokens = _peft_greedy(base, paths[lr.lora_name] if lr else None, prompt, device)
        assert out.outputs[0].token_ids == ref_tokens
    assert calls, "the folded path never ran"


def test_mixed_steps_match_peft_with_triton_kernels(tiny, device):
    """Requests arriving while others decode: their prompts are prefilled in mixed steps with
    the decoding rows (the Triton LoRA kernels over prompt and decode tokens together)."""
    from lorry.engine import LoRARequest, SamplingParams
    base, paths = tiny
    eng = _engine(base, device)
    reqs = [LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(paths.items())]
    for lr in reqs:
        eng.add_lora(lr)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    work = [("a", [5, 9, 33, 70, 12], reqs[0]), ("b", [40, 41], None),
            ("c", [7, 8, 9, 10, 11, 12, 13], reqs[1]), ("d", [99, 3, 60], reqs[2])]
    outs = {}
    for rid, prompt, lr in work:          # one arrival per step: each prefill rides with decodes
        eng.add_request(rid, prompt, sp, lr)
        outs.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
    assert eng.cache_stats()["steps"]["prefill"]["mixed"] >= 3
    for rid, prompt, lr in work:
        _, want = _peft_greedy(base, paths[lr.lora_name] if lr else None, prompt, device)
        assert outs[rid] == want, rid


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_prefill_and_prefix_hits_through_the_paged_prefill_kernel(tiny, device, fused,
                                                                         monkeypatch):
    """Prompts longer than a step's token budget (prefilled in chunks after their earlier
    chunks) and prompts sharing a cached prefix (prefilled after the shared blocks) attend
    through kernels.prefill_attention, as on CUDA, and give PEFT's greedy tokens: in the
    Llama-shaped blocks' Triton path (rotary + cache write kernel, the packed tokens), and
    in the torch layers' (the padded [B, S] queries)."""
    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
    from lorry.engine.model import attention, llama
    from lorry.kernels import prefill_attention as kernel
    base, paths = tiny
    # the engine takes the Triton paths on CUDA only: on CPU they are switched on here
    monkeypatch.setattr(llama, "fused_ops_on", lambda x: fused)
    if device.type == "cpu":
        monkeypatch.setattr(attention, "flash_decode", lambda q: True)
    calls = []
    real = kernel.prefill_attention
    monkeypatch.setattr(kernel, "prefill_attention",
                        lambda *a, **k: calls.append(k["row_stride"]) or real(*a, **k))
    backend = "triton" if device.type == "cuda" else "torch"
    eng = LLMEngine(EngineConfig(model=str(base), dtype="float32", device=device.type,
                                 max_loras=4, max_lora_rank=16, max_cpu_loras=4,
                                 lora_backend=backend,
                                 max_num_batched_tokens=24))   # a 40-token prompt: 2 chunks
    reqs = [LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(paths.items())]
    shared = [(7 * j + 3) % 120 + 1 for j in range(32)]          # two full blocks of 16
    work = [("long", [(5 * j + 1) % 110 + 2 for j in range(40)], reqs[0]),
            ("first", shared + [9, 8], reqs[1]),
            ("hit", shared + [70, 71, 72], reqs[1]),              # the shared blocks cached
            ("other_adapter", shared + [70, 71, 72], reqs[2]),    # same tokens, no sharing
            ("base", [40, 41, 42], None)]
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = {}
    for rid, prompt, lr in work[:2]:
        eng.add_request(rid, prompt, sp, lr)
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
    for rid, prompt, lr in work[2:]:
        eng.add_request(rid, prompt, sp, lr)
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
    kv = eng.cache_stats()["kv"]
    assert kv["prefix_hit_tokens"] == 32, kv      # "hit" reused the two blocks; nothing else
    assert calls, "the paged prefill kernel never ran"
    assert (0 in calls) == fused       # the fused path attends over the packed tokens
    for rid, prompt, lr in work:
        _, want = _peft_greedy(base, paths[lr.lora_name] if lr else None, prompt, device)
        assert outs[rid] == want, rid
