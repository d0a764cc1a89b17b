"""Adapters with PEFT features beyond plain LoRA serve PEFT's greedy tokens and logits in mixed
batches: bias="all"/"lora_only" (saved biases), lora_bias, DoRA, a trained lm_head
(modules_to_save), LoRA on lm_head and on embed_tokens."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.testing import make_peft_adapter, make_tiny_llama, make_tiny_model

PROMPTS = ["Hello there", "a", "The quick brown fox", "xyz 123", "!", "multi lora", "zz top",
           "long prompt " * 3]


def perturb(adapter, words: tuple[str, ...], scale: float, seed: int = 0) -> None:
    """Add noise to the saved tensors whose name contains one of ``words`` (PEFT saves biases,
    lm_heads and embedding A as the base's or zero values: make them matter)."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if any(w in name for w in words):
            tensors[name] = t + torch.randn(t.shape, generator=gen) * scale
    save_file(tensors, str(path), metadata={"format": "pt"})


class Bases:
    """A tiny base, its HF model, adapters on it and one PEFT model per adapter (each served
    alone, as PEFT serves it)."""

    def __init__(self, root, adapters: dict, config=None, **base_kw):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.dir = (make_tiny_llama(root / "base", **base_kw) if config is None
                    else make_tiny_model(root / "base", config, norm_noise=0.3))
        self.hf = AutoModelForCausalLM.from_pretrained(str(self.dir), dtype=torch.float32).eval()
        self.adapters, self.peft = {}, {}
        with warnings.catch_warnings():  # PEFT warns about unmergeable biases, saved embeddings
            warnings.simplefilter("ignore", UserWarning)
            for i, (name, (kw, noise)) in enumerate(adapters.items()):
                path = make_peft_adapter(self.dir, root / name, seed=i + 1, base_model=self.hf,
                                         **kw)
                if noise:
                    perturb(path, *noise, seed=i)
                self.adapters[name] = path
                self.peft[name] = PeftModel.from_pretrained(copy.deepcopy(self.hf),
                                                            str(path)).eval()


def greedy(model, ids: list[int], n: int):
    """Greedy tokens and the logits [n, V] that chose them (no KV cache)."""
    ids, logits = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids])).logits[0, -1]
            logits.append(row)
            ids.append(int(row.argmax()))
    return ids[-n:], torch.stack(logits)


def check_matches_peft(base: Bases, names, *, max_loras=2, max_tokens=5, atol=2e-5):
    """Serve one batch whose rows use ``names`` (None: no adapter); assert each row's tokens
    and logits are PEFT's; return how many rows differ from the base model's tokens."""
    eng = LLMEngine(EngineConfig(model=str(base.dir), max_loras=max_loras, max_lora_rank=8,
                                 max_num_seqs=8, max_model_len=128, lora_backend="torch",
                                 device="cpu"))
    captured = {}
    eng.runner.logits_hook = lambda seqs, lg: [captured.setdefault(s.request_id, []).append(
        r.clone()) for s, r in zip(seqs, lg)]
    reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(base.adapters.items())}
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = eng.generate(PROMPTS[:len(names)], sp, [reqs[n] if n else None for n in names],
                        use_tqdm=False)
    changed = 0
    for out, name in zip(outs, names):
        tokens, logits = greedy(base.peft[name] if name else base.hf, out.prompt_token_ids,
                                max_tokens)
        assert out.outputs[0].token_ids == tokens, f"row with adapter {name}"
        torch.testing.assert_close(torch.stack(captured[out.request_id]), logits,
                                   atol=atol, rtol=atol)
        changed += tokens != greedy(base.hf, out.prompt_token_ids, max_tokens)[0]
    return changed


QV = ("q_proj", "v_proj")
ALL = "all-linear"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2 (q/k/v biases): saved biases, lora_bias, DoRA (with saved biases), plain."""
    return Bases(tmp_path_factory.mktemp("qwen2"), {
        "bias_all": ({"target_modules": QV, "bias": "all"}, (("bias",), 0.3)),
        "lora_bias": ({"target_modules": ("k_proj", "o_proj", "down_proj"), "lora_bias": True,
                       "init_scale": 0.3}, None),
        "dora": ({"target_modules": ALL, "use_dora": True, "bias": "lora_only", "r": 4},
                 (("bias",), 0.3)),
        "plain": ({"target_modules": ALL}, None),
    }, model_type="qwen2")


def test_bias_lora_bias_and_dora_adapters_match_peft_in_mixed_batches(qwen2):
    names = ["bias_all", None, "lora_bias", "dora", "plain", "dora", "bias_all", None]
    assert check_matches_peft(qwen2, names, max_loras=4) >= 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama (no biases): a trained lm_head, LoRA on lm_head, LoRA on embed_tokens, DoRA,
    bias="all" (which saves nothing on a bias-free base)."""
    return Bases(tmp_path_factory.mktemp("llama"), {
        "head_full": ({"target_modules": QV, "modules_to_save": ["lm_head"]},
                      (("lm_head",), 0.05)),
        "head_lora": ({"target_modules": ("q_proj", "lm_head"), "init_scale": 0.3}, None),
        "embed": ({"target_modules": ("embed_tokens", "v_proj")}, (("lora_embedding_A",), 1.0)),
        "dora": ({"target_modules": ALL, "use_dora": True}, None),
        "bias_all": ({"target_modules": ALL, "bias": "all"}, None),
    })


def test_head_embedding_and_dora_adapters_match_peft_in_mixed_batches(llama):
    names = ["head_full", None, "head_lora", "embed", "dora", "head_full", "embed", "bias_all"]
    assert check_matches_peft(llama, names, max_loras=5) >= 5


def test_slot_reuse_drops_the_previous_adapters_head_and_embedding(llama):
    """One slot serves the adapters in turn: each row gets its own head/embedding, never a
    previous occupant's."""
    names = ["head_full", "embed", "head_lora", None, "dora", "head_full"]
    check_matches_peft(llama, names, max_loras=1, max_tokens=3)


def test_gemma3_embedding_and_head_lora_match_peft(tmp_path):
    """Gemma scales its embeddings (the LoRA part too) and soft-caps the tied head's logits."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, vocab_size=259, max_position_embeddings=256,
                           num_hidden_layers=2, head_dim=16, final_logit_softcapping=5.0)
    base = Bases(tmp_path, {
        "embed": ({"target_modules": ("embed_tokens", "q_proj")}, (("lora_embedding_A",), 1.0)),
        "head": ({"target_modules": ("lm_head", "o_proj"), "init_scale": 0.3}, None),
        "dora": ({"target_modules": ("q_proj", "down_proj"), "use_dora": True}, None),
    }, config=cfg)
    assert check_matches_peft(base, ["embed", None, "head", "dora", "embed"], max_loras=3) >= 3


def _add_tensors(adapter, dst, **tensors):
    """Copy ``adapter`` to ``dst`` with extra tensors (name -> shape) in its weights file."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    weights.update({k: torch.ones(shape) for k, shape in tensors.items()})
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("tensors, error, words", [
    ({"base_model.model.model.embed_tokens.lora_magnitude_vector": (64,)},
     "UnsupportedAdapterError", "embed_tokens and lm_head take a plain LoRA"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": (64,)},
     "BaseModelMismatchError", "has none"),
    ({"base_model.model.lm_head.weight": (300, 64)}, "BaseModelMismatchError", r"\[259, 64\]"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": (32,)},
     "BaseModelMismatchError", r"needs \[64\]"),
    ({"base_model.model.lm_head.lora_A.weight": (8, 64)}, "AdapterFormatError",
     "lm_head lacks lora_A or lora_B"),
])
def test_unservable_parts_are_refused_before_loading(llama, tmp_path, tensors, error, words):
    from lorry.engine import errors
    from lorry.engine.lora.spec import parse_adapter, read_base_config

    bad = _add_tensors(llama.adapters["bias_all"], tmp_path / "bad", **tensors)
    with pytest.raises(getattr(errors, error), match=words):
        parse_adapter(bad, read_base_config(llama.dir), max_lora_rank=8)


def test_adapter_whose_saved_base_embedding_differs_is_refused_at_load(llama, tmp_path):
    import shutil

    from lorry.engine.errors import BaseModelMismatchError

    changed = tmp_path / "changed"
    shutil.copytree(llama.adapters["embed"], changed)
    perturb(changed, ("embed_tokens.base_layer.weight",), 0.1)
    eng = LLMEngine(EngineConfig(model=str(llama.dir), max_loras=1, max_lora_rank=8,
                                 device="cpu", max_model_len=64))
    with pytest.raises(BaseModelMismatchError, match="differ from the base's"):
        eng.add_lora(LoRARequest("changed", 1, str(changed)))
    eng.add_lora(LoRARequest("same", 2, str(llama.adapters["embed"])))  # the base's own copy
