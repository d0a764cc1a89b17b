"""Fixtures of the engine tests: tiny random bases with PEFT adapters, and a PEFT oracle."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorry.testing import make_peft_adapter, make_tiny_llama

SMOLLM2 = Path("/root/.cache/lorry/models/SmolLM2-135M-Instruct")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> make_peft_adapter kwargs: ranks, alphas, targets, rslora and patterns all differ
ADAPTERS = {
    "qv_r8": {"r": 8, "lora_alpha": 16, "target_modules": ("q_proj", "v_proj"), "seed": 1},
    "all_r4_rslora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True, "seed": 2},
    "mlp_r16": {"r": 16, "lora_alpha": 8, "target_modules": ("gate_proj", "up_proj", "down_proj"), "seed": 3},
    "pattern": {"r": 8, "lora_alpha": 16, "target_modules": ALL, "rank_pattern": {"k_proj": 2, "down_proj": 4},
                    "alpha_pattern": {"o_proj": 32}, "seed": 4},
}


class TinyBase:
    """A base directory, its HF model and adapters built on it."""

    def __init__(self, root: Path, **kwargs):
        from transformers import AutoModelForCausalLM

        self.dir = make_tiny_llama(root / "base", **kwargs)
        self.hf = AutoModelForCausalLM.from_pretrained(str(self.dir), dtype=torch.float32).eval()
        self.adapters = {name: make_peft_adapter(self.dir, root / name, base_model=self.hf, **kw)
                         for name, kw in ADAPTERS.items()}
        self._peft = None

    def peft(self):
        """One PeftModel holding every adapter (mixed batches via ``adapter_names``)."""
        if self._peft is None:
            import copy

            from peft import PeftModel

            names = list(self.adapters)
            model = PeftModel.from_pretrained(copy.deepcopy(self.hf), str(self.adapters[names[0]]),
                                              adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(self.adapters[name]), adapter_name=name)
            self._peft = model.eval()
        return self._peft


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyBase:
    """GQA Llama: 4 query heads over 2 KV heads."""
    return TinyBase(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> TinyBase:
    """Qwen2 (q/k/v biases) with tied embeddings."""
    return TinyBase(tmp_path_factory.mktemp("qwen2"), model_type="qwen2", tie_word_embeddings=True)


def advance(sch, plan, life: dict, steps: int) -> None:
    """A scheduler-only step: the plan's prompts count as computed, and each sequence ends
    after ``steps`` steps (``life``: sequence -> steps it ran)."""
    for s in plan.seqs:
        if plan.prefill:
            s.num_computed_tokens = len(s.prompt_token_ids)
        life[s] = life.get(s, 0) + 1
        if life[s] >= steps:
            sch.finish(s)


def peft_greedy(model, prompt_ids: list[int], n: int, adapter: str | None):
    """PEFT reference: greedy tokens and the logits [n, V] that chose them (no KV cache)."""
    ids, logits = list(prompt_ids), []
    kw = {"adapter_names": [adapter or "__base__"]} if hasattr(model, "peft_config") else {}
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids]), **kw).logits[0, -1]
            logits.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt_ids):], torch.stack(logits)
