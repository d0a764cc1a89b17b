"""SmolLM2-135M-Instruct on a GPU against the CPU reference path (issue 7).

fp32: the CUDA engine (decode in CUDA graphs, Triton LoRA kernels) gives the same greedy
tokens as the CPU engine for a mixed batch of the demo prompts over the base and the three
demo adapters. bf16: its logits agree with the fp32 CPU ones within bf16 tolerance.

Needs CUDA and the prepared demo model (``lorry model prepare``; ``LORRY_SMOLLM2_DIR``
points elsewhere). It runs on the device machine, where the GGUF travels in two parts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.demo_model import demo_model_dir

ROOT = Path(__file__).resolve().parents[3]
MODEL = Path(os.environ.get("LORRY_SMOLLM2_DIR")
             or demo_model_dir(os.environ.get("LORRY_MODELS_DIR")))
ADAPTERS = ["json", "numbered", "uppercase"]

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(),
                       reason=f"the demo model is not prepared in {MODEL}"),
]


def _engine(device: str, dtype: str) -> LLMEngine:
    # 6 rows for 20 requests: sequences join the running batch as others finish
    return LLMEngine(EngineConfig(model=str(MODEL), device=device, dtype=dtype, max_loras=3,
                                  max_lora_rank=32, max_num_seqs=6, max_model_len=256))


def _workload():
    prompts = json.loads((ROOT / "lorry" / "demo_prompts.json").read_text())["prompts"]
    reqs = [None] + [LoRARequest(n, i + 1, str(ROOT / "adapters" / "demo" / n))
                     for i, n in enumerate(ADAPTERS)]
    rows = [(p, r) for r in reqs for p in prompts]
    return [[{"role": "user", "content": p}] for p, _ in rows], [r for _, r in rows]


def _generate(eng: LLMEngine, tokens: int = 32):
    prompts, loras = _workload()
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    outs = eng.generate(prompts, params, loras, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def cpu_engine():
    return _engine("cpu", "float32")


def test_fp32_gpu_greedy_tokens_equal_the_cpu_path(cpu_engine):
    gpu = _engine("cuda", "float32")
    want, got = _generate(cpu_engine), _generate(gpu)
    assert gpu.runner.graphs is not None and gpu.runner.graphs.captures >= 1
    assert sum(len(t) for t in want) > 20 * 8     # real generations, not instant EOS
    for i, (w, g) in enumerate(zip(want, got)):
        assert g == w, f"row {i}: GPU {g} != CPU {w}"


def _hf_bf16_error(ids, ref) -> float:
    """How far transformers' own bf16 forward on the GPU lands from the fp32 logits: the
    tolerance bf16 itself costs on this model (base rows; the fp32 paths agree to 1e-4)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.bfloat16).cuda().eval()
    worst = 0.0
    with torch.no_grad():
        for p, r in zip(ids, ref):
            g = hf(torch.tensor([p], device="cuda")).logits[0].float().cpu()
            worst = max(worst, ((g - r).norm() / r.norm()).item())
    return worst


def test_bf16_gpu_logits_agree_with_cpu_fp32_within_bf16_tolerance(cpu_engine):
    gpu = _engine("cuda", "bfloat16")
    prompts, loras = _workload()
    ids = [gpu.tokenizer.encode_prompt(p)[1] for p in prompts]
    ref = cpu_engine.compute_logits(ids, loras)
    got = gpu.compute_logits(ids, loras)
    base_rows = [i for i, lr in enumerate(loras) if lr is None]
    tol = _hf_bf16_error([ids[i] for i in base_rows], [ref[i] for i in base_rows])
    assert tol < 0.1, f"transformers' bf16 error {tol:.4f} is unexpectedly large"
    agree = 0
    for i, (r, g) in enumerate(zip(ref, got)):
        g = g.float().cpu()
        rel = ((g - r).norm() / r.norm()).item()
        # within 2x of transformers' own bf16 error on base rows: adapter rows add bf16 LoRA
        # matmuls (their [T, r] intermediate is rounded too). Measured on the H200: base rows
        # 0.024-0.027, adapter rows 0.031-0.044, transformers 0.028 (docs/BENCHMARKS.md)
        assert rel <= 2.0 * tol, (f"row {i}: bf16 logits differ from fp32 by {rel:.4f} "
                                  f"(relative); transformers' bf16 differs by {tol:.4f}")
        agree += int(g[-1].argmax() == r[-1].argmax())
    assert agree >= len(ids) - 1, f"next-token argmax agrees on {agree}/{len(ids)} rows only"
