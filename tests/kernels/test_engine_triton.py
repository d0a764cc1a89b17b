"""The engine with the Triton LoRA kernels matches PEFT on a mixed-adapter batch.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from kernels import get_lora_ops
from tests.tiny_models import make_tiny_base_and_adapters

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
    from engine import EngineConfig, LLMEngine
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
    from engine import LoRARequest, SamplingParams
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
