"""GPU path (CUDA graphs + Triton LoRA) against the CPU reference path; runs only with CUDA."""
from __future__ import annotations

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = ["qv_r8", "all_r4_rslora", "mlp_r16", "pattern"]


def _run(base, device: str, dtype: str, eager: bool = False, n: int = 11, tokens: int = 12,
         fold: bool = True):
    eng = LLMEngine(EngineConfig(model=str(base.dir), device=device, dtype=dtype, max_loras=4,
                                 max_lora_rank=16, max_num_seqs=8, max_model_len=64,
                                 enforce_eager=eager, lora_fold=fold))
    reqs = [LoRARequest(name, i + 1, str(base.adapters[name])) for i, name in enumerate(NAMES)]
    # more requests than rows and unequal lengths: sequences join while others decode, in
    # freed rows between live ones, so several row buckets and LoRA layer sets get captured
    prompts = [[3 + (7 * i + j) % 200 for j in range(5 + i % 4)] for i in range(n)]
    loras = [reqs[i % 4] if i % 5 else None for i in range(n)]
    params = [SamplingParams(max_tokens=max(1, tokens - 3 * (i % 4)), temperature=0.0,
                             ignore_eos=True) for i in range(n)]
    outs = eng.generate(prompts, params, loras, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], eng


@pytest.mark.parametrize("fold", [True, False])
def test_graph_decode_fp32_equals_cpu_token_for_token(tiny_llama, fold, monkeypatch):
    # fold: the A slots sit under the base weights and decode steps run only the expand
    from lorry.engine.lora import slot_layout
    from lorry.engine.lora.slot_layout import FoldedA
    monkeypatch.setattr(slot_layout, "FOLD_MAX_EXTRA", 100.0)   # tiny layers: fold them all
    cpu, _ = _run(tiny_llama, "cpu", "float32")
    gpu, eng = _run(tiny_llama, "cuda", "float32", fold=fold)
    assert eng.runner.graphs is not None and eng.runner.graphs.captures >= 2
    kinds = eng.loras.gpu.buffers.values()
    assert all(isinstance(a, FoldedA) == fold for a, _ in kinds)
    assert gpu == cpu


def test_graph_decode_equals_eager_decode_on_gpu(tiny_llama):
    graphed, _ = _run(tiny_llama, "cuda", "float32")
    eager, eng = _run(tiny_llama, "cuda", "float32", eager=True)
    assert eng.runner.graphs is None
    assert graphed == eager


def test_bf16_logits_agree_with_cpu_fp32(tiny_llama):
    _, cpu = _run(tiny_llama, "cpu", "float32", n=1, tokens=1)
    _, gpu = _run(tiny_llama, "cuda", "bfloat16", n=1, tokens=1)
    prompts = [[5, 9, 33, 7, 81, 2, 14], [40, 41, 42]]
    reqs = [LoRARequest("pattern", 4, str(tiny_llama.adapters["pattern"])), None]
    ref = cpu.compute_logits(prompts, reqs)
    got = gpu.compute_logits(prompts, reqs)
    for r, g in zip(ref, got):
        rel = (g.float().cpu() - r).norm() / r.norm()
        assert rel < 2e-2, f"bf16 logits differ from fp32 by {rel:.4f} (relative)"
