"""Adapter features beyond plain LoRA on the GPU path (Triton LoRA, folded A slots, CUDA
graphs with per-slot shifts/scales, eager steps for slots with their own lm_head or embedding
LoRA) against the CPU path, token for token in fp32; runs only with CUDA."""
from __future__ import annotations

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from tests.unit.engine.test_engine_adapter_features import ALL, QV, Bases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_cuda")
    qwen2 = Bases(root / "qwen2", {
        "bias_all": ({"target_modules": QV, "bias": "all"}, (("bias",), 0.3)),
        "lora_bias": ({"target_modules": ("k_proj", "o_proj", "down_proj"), "lora_bias": True,
                       "init_scale": 0.3}, None),
        "dora": ({"target_modules": ALL, "use_dora": True, "bias": "lora_only", "r": 4},
                 (("bias",), 0.3)),
        "plain": ({"target_modules": ALL}, None)}, model_type="qwen2")
    llama = Bases(root / "llama", {
        "head_full": ({"target_modules": QV, "modules_to_save": ["lm_head"]},
                      (("lm_head",), 0.05)),
        "head_lora": ({"target_modules": ("q_proj", "lm_head"), "init_scale": 0.3}, None),
        "embed": ({"target_modules": ("embed_tokens", "v_proj")}, (("lora_embedding_A",), 1.0)),
        "dora": ({"target_modules": ALL, "use_dora": True}, None)})
    return {"qwen2": qwen2, "llama": llama}


def _run(base: Bases, device: str, n: int = 11, tokens: int = 12):
    eng = LLMEngine(EngineConfig(model=str(base.dir), device=device, dtype="float32",
                                 max_loras=2, max_lora_rank=8, max_num_seqs=8, max_model_len=64))
    names = list(base.adapters)
    reqs = [LoRARequest(name, i + 1, str(base.adapters[name])) for i, name in enumerate(names)]
    # more requests than rows and slots: adapters swap while others decode, so graphs are
    # captured with and without per-slot shifts/scales, and head/embedding steps run eagerly
    prompts = [[3 + (7 * i + j) % 200 for j in range(5 + i % 4)] for i in range(n)]
    loras = [reqs[i % len(reqs)] if i % 5 else None for i in range(n)]
    params = [SamplingParams(max_tokens=max(1, tokens - 3 * (i % 4)), temperature=0.0,
                             ignore_eos=True) for i in range(n)]
    outs = eng.generate(prompts, params, loras, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], eng


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_feature_adapters_on_gpu_equal_cpu_token_for_token(bases, name, monkeypatch):
    from lorry.engine.lora import slot_layout

    monkeypatch.setattr(slot_layout, "FOLD_MAX_EXTRA", 100.0)   # tiny layers: fold them all
    cpu, _ = _run(bases[name], "cpu")
    gpu, eng = _run(bases[name], "cuda")
    # qwen2's bias adapters add a graph variant with per-slot shifts; llama's head/embedding
    # slots step eagerly, so its DoRA and base rows share one captured bucket
    assert eng.runner.graphs is not None
    assert eng.runner.graphs.captures >= (2 if name == "qwen2" else 1)
    assert gpu == cpu
