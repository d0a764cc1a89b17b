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


def check_matches_peft(base: Bases, names, *, max_loras=2, max_tokens=5, atol=2e-5,
                       inspect=None, **engine_kw):
    """Serve one batch whose rows use ``names`` (None: no adapter); assert each row's tokens
    and logits are PEFT's; return how many rows differ from the base model's tokens.
    ``inspect(engine, step's sequences)`` runs at every step; ``engine_kw`` go to EngineConfig."""
    kw = {"max_lora_rank": 8, "max_num_seqs": 8, "max_model_len": 128, "lora_backend": "torch",
          "device": "cpu", **engine_kw}
    eng = LLMEngine(EngineConfig(model=str(base.dir), max_loras=max_loras, **kw))
    captured = {}

    def hook(seqs, lg):
        if inspect is not None:
            inspect(eng, seqs)
        for s, r in zip(seqs, lg):
            captured.setdefault(s.request_id, []).append(r.clone())
    eng.runner.logits_hook = hook
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
    eng.loras.close()
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


def test_extras_loaded_in_the_loader_process_match_peft(llama, qwen2):
    """Heads, embeddings, DoRA magnitudes and bias terms come back from the loader process
    (EngineConfig.lora_load_process) as they are read in a thread."""
    names = ["head_full", None, "head_lora", "embed", "dora", "head_full", "embed", "bias_all"]
    assert check_matches_peft(llama, names, max_loras=5, lora_load_process=True) >= 5
    names = ["bias_all", None, "lora_bias", "dora", "plain", "dora", "bias_all", None]
    assert check_matches_peft(qwen2, names, max_loras=4, lora_load_process=True) >= 4


def test_extras_over_slot_memory_shared_by_rank_match_peft(llama, qwen2):
    """Rank-32 slots' memory in 16-row pages, two pages for four slot ids: the adapters (ranks
    4-8, a page each) take turns in the two pages, their blocks rewritten at either; DoRA's
    norms, bias terms, heads and embeddings follow each adapter's own rows."""
    resident, firsts = [], set()

    def inspect(eng, seqs):
        gpu = eng.loras.gpu
        resident.append(len(gpu.slot_of))
        firsts.update(first for first, _ in gpu.block_of.values())

    names = ["head_full", None, "head_lora", "embed", "dora", "head_full", "embed", "bias_all"]
    assert check_matches_peft(llama, names, max_loras=4, max_lora_rank=32, inspect=inspect,
                              lora_memory_slots=1) >= 5
    assert max(resident) == 2 and firsts == {0, 1}   # two adapters in one rank-32 slot's memory
    names = ["bias_all", None, "lora_bias", "dora", "plain", "dora", "bias_all", None]
    assert check_matches_peft(qwen2, names, max_loras=4, max_lora_rank=32,
                              lora_memory_slots=1) >= 4


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
    ({"base_model.model.model.embed_tokens.weight": (300, 64)}, "BaseModelMismatchError",
     r"trained embed_tokens .* \[259, 64\]"),
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


@pytest.mark.parametrize("tied", [False, True])
def test_trained_embedding_modules_to_save_matches_peft_in_mixed_batches(tmp_path, tied):
    """modules_to_save=["embed_tokens"]: the adapter's rows embed their tokens with its own
    trained copy; on a tied base PEFT keeps the lm_head on the base embedding, and so do we."""
    base = Bases(tmp_path, {
        "embed_full": ({"target_modules": QV, "modules_to_save": ["embed_tokens"]},
                       (("embed_tokens.weight",), 0.5)),
        "embed_head": ({"target_modules": ("k_proj",),
                        "modules_to_save": ["embed_tokens"] + ([] if tied else ["lm_head"])},
                       (("embed_tokens.weight", "lm_head.weight"), 0.3)),
        "plain": ({"target_modules": ALL}, None),
    }, tie_word_embeddings=tied)
    names = ["embed_full", None, "embed_head", "plain", "embed_full", "embed_head"]
    assert check_matches_peft(base, names, max_loras=3) >= 4
    check_matches_peft(base, ["embed_full", "embed_head", None, "embed_full"], max_loras=1,
                       max_tokens=3)  # one slot, reused: no previous occupant's embedding


@pytest.fixture(scope="module")
def full_copies(tmp_path_factory):
    """Adapters with one full trained matrix each (lm_head, embed_tokens), one with both."""
    return Bases(tmp_path_factory.mktemp("full"), {
        "head_full": ({"target_modules": QV, "modules_to_save": ["lm_head"]},
                      (("lm_head",), 0.05)),
        "embed_full": ({"target_modules": ("k_proj",), "modules_to_save": ["embed_tokens"]},
                       (("embed_tokens.weight",), 0.5)),
        "both": ({"target_modules": ("o_proj",), "modules_to_save": ["lm_head", "embed_tokens"]},
                 (("lm_head", "embed_tokens.weight"), 0.3)),
        "plain": ({"target_modules": ALL}, None),
    })


def test_full_copy_cap_makes_rows_wait_and_stays_exact(full_copies):
    """max_full_module_copies=1 with three slots: the two adapters with a full copy never sit
    in the slots together; the second one's rows wait for the first one's, and every row is
    still PEFT's."""
    seen = []

    def inspect(eng, seqs):
        gpu = eng.loras.gpu
        seen.append(sum(c for c, _ in gpu.full_copies.values()))
        stats = eng.cache_stats()
        assert stats["full_copy_bytes"] == stats["gpu"]["full_copy_bytes"] == gpu.full_copy_bytes
        names = {s.lora_request.lora_name for s in seqs if s.lora_request is not None}
        assert not {"head_full", "embed_full"} <= names

    names = ["head_full", None, "embed_full", "plain", "head_full", "embed_full"]
    assert check_matches_peft(full_copies, names, max_loras=3, inspect=inspect,
                              max_full_module_copies=1) >= 4
    assert seen and max(seen) == 1  # one copy at a time, in every step


def test_full_copy_cap_evicts_idle_holders_and_reports_bytes(full_copies):
    eng = LLMEngine(EngineConfig(model=str(full_copies.dir), max_loras=3, max_lora_rank=8,
                                 device="cpu", max_model_len=64, lora_backend="torch",
                                 max_full_module_copies=1))
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    req = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(full_copies.adapters.items())}
    assert eng.cache_stats()["full_copy_bytes"] == 0
    eng.generate("hi", sp, req["head_full"], use_tqdm=False)
    one = 259 * 64 * 4  # vocab x hidden, float32
    assert eng.cache_stats()["full_copy_bytes"] == one
    eng.generate("hi", sp, req["embed_full"], use_tqdm=False)  # evicts the idle head_full
    stats = eng.cache_stats()
    assert stats["full_copy_bytes"] == one and stats["gpu"]["full_copies"] == 1
    assert eng.list_loras()["gpu"] == [req["embed_full"].lora_int_id]
    eng.generate("hi", sp, req["plain"], use_tqdm=False)  # no copy: nothing evicted
    assert eng.cache_stats()["full_copy_bytes"] == one
    assert len(eng.list_loras()["gpu"]) == 2


def test_full_copy_cap_refusals_name_the_setting(full_copies):
    from lorry.engine.errors import LoRAError

    eng = LLMEngine(EngineConfig(model=str(full_copies.dir), max_loras=3, max_lora_rank=8,
                                 device="cpu", max_model_len=64, lora_backend="torch",
                                 max_full_module_copies=1))
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    req = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(full_copies.adapters.items())}
    with pytest.raises(LoRAError, match=r"2 full module copies.*max_full_module_copies=1 "
                                        r"\(LORRY_MAX_FULL_MODULE_COPIES\)"):
        eng.add_lora(req["both"])
    eng.add_lora(req["head_full"])
    eng.pin_lora(req["head_full"].lora_int_id)
    with pytest.raises(LoRAError, match=r"pinned adapters hold 1 of max_full_module_copies=1 "
                                        r"\(LORRY_MAX_FULL_MODULE_COPIES\)"):
        eng.generate(["a", "b"], sp, [req["plain"], req["embed_full"]], use_tqdm=False)
    assert not eng.has_unfinished_requests()
    with pytest.raises(LoRAError, match="LORRY_MAX_FULL_MODULE_COPIES"):
        eng.pin_lora(req["embed_full"].lora_int_id)  # the pinned head_full holds the one copy
    outs = eng.generate(["a", "b"], sp, [req["head_full"], req["plain"]], use_tqdm=False)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    eng.unpin_lora(req["head_full"].lora_int_id)
    eng.generate("a", sp, req["embed_full"], use_tqdm=False)  # head_full is idle now: evicted
    assert eng.cache_stats()["gpu"]["full_copies"] == 1


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_max_full_module_copies_is_validated(value):
    with pytest.raises(ValueError, match="max_full_module_copies"):
        EngineConfig(model="m", max_full_module_copies=value)
    assert EngineConfig(model="m", max_full_module_copies=0).max_full_module_copies == 0
    assert EngineConfig(model="m").max_full_module_copies is None


def test_trained_and_lora_embedding_together_are_refused(llama, tmp_path):
    from lorry.engine.errors import UnsupportedAdapterError
    from lorry.engine.lora.spec import parse_adapter, read_base_config

    bad = _add_tensors(llama.adapters["embed"], tmp_path / "bad",
                       **{"base_model.model.model.embed_tokens.weight": (259, 64)})
    with pytest.raises(UnsupportedAdapterError, match="both a trained embed_tokens"):
        parse_adapter(bad, read_base_config(llama.dir), max_lora_rank=8)
