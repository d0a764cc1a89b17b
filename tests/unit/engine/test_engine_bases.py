"""Each supported base serves mixed-adapter batches with PEFT's greedy tokens and logits:
Qwen3, Mistral/Qwen2 with sliding windows, Phi-3 (fused projections, longrope, partial
rotary), Gemma 2 and Gemma 3 text, Granite (multipliers), OLMo 2 (post-norms, wide q/k
norms), YaRN rope."""
from __future__ import annotations

import copy

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.testing import make_peft_adapter, make_tiny_model, write_random_adapter
from tests.unit.engine.conftest import peft_greedy

VOCAB = 259
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 96, "vocab_size": VOCAB, "max_position_embeddings": 256}
SHORT = ["Hello there", "a", "The quick", "xyz 1", "!"]
# more tokens than the windows below (8) and than longrope's original context (32)
LONG = "a long prompt that runs well past every sliding window here"
MIXED = [("one", SHORT[0]), (None, LONG), ("two", SHORT[1]), ("one", LONG[::-1]),
         (None, SHORT[2]), ("two", SHORT[3] + LONG)]
ATTN_MLP = ("q_proj", "v_proj", "down_proj")


class Base:
    """A tiny random base of ``config`` with two PEFT adapters and a PEFT model of both."""

    def __init__(self, root, config, targets, norm_noise=0.0):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.dir = make_tiny_model(root / "base", config, norm_noise=norm_noise)
        # eager attention is HF's reference: some transformers releases route Gemma 2 through
        # SDPA, which drops its attention soft-capping
        self.hf = AutoModelForCausalLM.from_pretrained(str(self.dir), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        self.adapters = {name: make_peft_adapter(self.dir, root / name, r=r, lora_alpha=16,
                                                 target_modules=t, seed=i + 1, base_model=self.hf)
                         for i, (name, r, t) in enumerate([("one", 8, targets[0]),
                                                           ("two", 4, targets[1])])}
        self.peft = PeftModel.from_pretrained(copy.deepcopy(self.hf), str(self.adapters["one"]),
                                              adapter_name="one")
        self.peft.load_adapter(str(self.adapters["two"]), adapter_name="two")
        self.peft.eval()


def check_matches_peft(base: Base, rows=MIXED, *, max_tokens=6, atol=1e-5, **engine_kw):
    """Run ``rows`` ((adapter name or None, prompt)) as one batch; assert PEFT's greedy
    tokens and logits for every row; return the outputs."""
    kw = {"max_loras": 2, "max_lora_rank": 8, "max_num_seqs": 8, "max_model_len": 128,
          "lora_backend": "torch", "device": "cpu", **engine_kw}
    eng = LLMEngine(EngineConfig(model=str(base.dir), **kw))
    captured = {}
    eng.runner.logits_hook = lambda seqs, lg: [captured.setdefault(s.request_id, []).append(
        r.clone()) for s, r in zip(seqs, lg)]
    reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(base.adapters.items())}
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = eng.generate([p for _, p in rows], sp, [reqs[n] if n else None for n, _ in rows],
                        use_tqdm=False)
    for out, (name, _) in zip(outs, rows):
        tokens, logits = peft_greedy(base.peft, out.prompt_token_ids, max_tokens, name)
        assert out.outputs[0].token_ids == tokens, f"row with adapter {name}"
        torch.testing.assert_close(torch.stack(captured[out.request_id]), logits,
                                   atol=atol, rtol=atol)
    return outs


def _base_tokens(base: Base, outs, n=6):
    return [peft_greedy(base.hf, o.prompt_token_ids, n, None)[0] for o in outs]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from transformers import Qwen3Config

    # head_dim wider than hidden/heads, as in the real Qwen3 checkpoints
    cfg = Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=24, tie_word_embeddings=True)
    return Base(tmp_path_factory.mktemp("qwen3"), cfg, ("all-linear", ATTN_MLP), norm_noise=0.3)


def test_qwen3_mixed_batch_matches_peft(qwen3):
    outs = check_matches_peft(qwen3)
    # the adapters and the q/k norms matter: adapter rows leave the base's tokens
    base = _base_tokens(qwen3, outs)
    assert sum(o.outputs[0].token_ids != b for o, b in zip(outs, base)) >= 2


def test_mistral_sliding_window_masks_old_keys_in_prefill_decode_and_chunks(tmp_path):
    from transformers import MistralConfig

    cfg = MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=8)
    base = Base(tmp_path, cfg, ("all-linear", ATTN_MLP))
    check_matches_peft(base, max_tokens=12)
    # prompts split into chunks after cached prefixes keep the window too
    check_matches_peft(base, max_tokens=4, max_num_batched_tokens=16)
    eng = LLMEngine(EngineConfig(model=str(base.dir), device="cpu", max_model_len=8))
    assert eng.model.layers[0].self_attn.window is None  # a window >= max_model_len masks nothing


def test_qwen2_window_on_upper_layers_only(tmp_path):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**SMALL, num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1)
    base = Base(tmp_path, cfg, ("all-linear", ATTN_MLP))
    check_matches_peft(base, max_tokens=10)
    eng = LLMEngine(EngineConfig(model=str(base.dir), device="cpu", max_model_len=64))
    assert [layer.self_attn.window for layer in eng.model.layers] == [None, 8, 8]


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    from transformers import Phi3Config

    # Phi-4-mini style: longrope over 3/4 of each head (12 of 16 dims: 6 factors)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.2, 1.8, 2.6, 3.5, 4.5, 6.0], "original_max_position_embeddings": 32}
    cfg = Phi3Config(**{**SMALL, "max_position_embeddings": 128}, num_hidden_layers=2,
                     rope_parameters=rope, original_max_position_embeddings=32,
                     partial_rotary_factor=0.75)
    return Base(tmp_path_factory.mktemp("phi3"), cfg,
                (("qkv_proj", "gate_up_proj"), "all-linear"))


def test_phi3_fused_projection_adapters_match_peft_within_original_context(phi3):
    rows = [("one", SHORT[0]), (None, SHORT[2]), ("two", SHORT[3]), ("one", "ab cd ef")]
    outs = check_matches_peft(phi3, rows)
    base = _base_tokens(phi3, outs)
    assert sum(o.outputs[0].token_ids != b for o, b in zip(outs, base)) >= 2


def test_phi3_long_prompts_use_longrope_long_factors(phi3):
    # every row lies past the original 32 positions from its prompt on: long factors, as HF
    rows = [("one", LONG), (None, LONG[::-1]), ("two", LONG + "!")]
    check_matches_peft(phi3, rows)


def test_phi3_adapters_name_fused_modules(phi3):
    from lorry.engine.errors import BaseModelMismatchError
    from lorry.engine.lora.spec import parse_adapter, read_base_config

    cfg = read_base_config(phi3.dir)
    spec = parse_adapter(phi3.adapters["one"], cfg)
    assert spec.target_modules == ["gate_up_proj", "qkv_proj"]
    llama_style = make_peft_adapter(phi3.dir, phi3.dir.parent / "bad", target_modules=["o_proj"])
    # an adapter of a q/k/v base does not fit: phi3 has no q_proj
    cfg_llama = {**cfg, "model_type": "llama"}
    with pytest.raises(BaseModelMismatchError, match="'gate_up_proj' does not exist in the base"):
        parse_adapter(phi3.adapters["one"], cfg_llama)
    assert parse_adapter(llama_style, cfg).target_modules == ["o_proj"]
    # adapters written from the config alone have phi3's fused widths too
    written = write_random_adapter(phi3.dir.parent / "written", cfg,
                                   target_modules=("qkv_proj", "gate_up_proj"))
    assert parse_adapter(written, cfg).target_modules == ["gate_up_proj", "qkv_proj"]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import Gemma2Config

    # small soft-caps so that tanh bends the random model's logits
    cfg = Gemma2Config(**SMALL, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                       sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    return Base(tmp_path_factory.mktemp("gemma2"), cfg, ("all-linear", ATTN_MLP), norm_noise=0.3)


def test_gemma2_mixed_batch_matches_peft(gemma2):
    check_matches_peft(gemma2, max_tokens=10)
    windows = [a.self_attn.window for a in
               LLMEngine(EngineConfig(model=str(gemma2.dir), device="cpu",
                                      max_model_len=64)).model.layers]
    assert windows == [8, None, 8, None]


def test_gemma3_text_mixed_batch_matches_peft(tmp_path):
    from transformers import Gemma3TextConfig

    types = ["sliding_attention", "sliding_attention", "full_attention"]
    cfg = Gemma3TextConfig(**SMALL, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=32,
                           sliding_window=8, layer_types=types, final_logit_softcapping=5.0,
                           rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 100.0},
                                            "full_attention": {"rope_type": "linear",
                                                               "factor": 4.0,
                                                               "rope_theta": 10000.0}})
    base = Base(tmp_path, cfg, ("all-linear", ATTN_MLP), norm_noise=0.3)
    check_matches_peft(base, max_tokens=10)


def test_granite_multipliers_match_peft(tmp_path):
    from transformers import GraniteConfig

    # multipliers far from their Llama values (1, 1, 1/sqrt(head_dim), 1) so each one matters
    cfg = GraniteConfig(**SMALL, num_hidden_layers=2, embedding_multiplier=6.0,
                        residual_multiplier=0.4, attention_multiplier=0.5, logits_scaling=3.0)
    base = Base(tmp_path, cfg, ("all-linear", ATTN_MLP), norm_noise=0.3)
    outs = check_matches_peft(base, max_tokens=8)
    assert sum(o.outputs[0].token_ids != b for o, b in zip(outs, _base_tokens(base, outs))) >= 2


def test_olmo2_post_norms_and_wide_qk_norms_match_peft(tmp_path):
    from transformers import Olmo2Config

    cfg = Olmo2Config(**SMALL, num_hidden_layers=2)
    base = Base(tmp_path, cfg, ("all-linear", ATTN_MLP), norm_noise=0.3)
    outs = check_matches_peft(base, max_tokens=8)
    assert sum(o.outputs[0].token_ids != b for o, b in zip(outs, _base_tokens(base, outs))) >= 2
    attn = LLMEngine(EngineConfig(model=str(base.dir), device="cpu")).model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (64,) and attn.k_norm.weight.shape == (32,)


def test_qwen2_yarn_rope_matches_peft(tmp_path):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**{**SMALL, "max_position_embeddings": 128}, num_hidden_layers=2,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 32})
    base = Base(tmp_path, cfg, ("all-linear", ATTN_MLP))
    check_matches_peft(base)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "supported bases: .*llama.*granite.*olmo2"),
    ({"hidden_act": "relu"}, "activation 'relu' is not supported; allowed: .*silu"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
])
def test_unsupported_bases_are_refused_before_loading(tmp_path, change, message):
    import json

    from lorry.testing import make_tiny_llama

    d = make_tiny_llama(tmp_path / "base")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    (d / "model.safetensors").write_bytes(b"not read")  # refused before the weights
    with pytest.raises(ValueError, match=message):
        LLMEngine(EngineConfig(model=str(d), device="cpu"))



def test_longrope_bases_share_no_prefix_blocks(phi3):
    """A longrope row's keys depend on its whole length (short or long factors), so cached
    prefix keys are not what a longer prompt computes: prefix caching stays off there."""
    eng = LLMEngine(EngineConfig(model=str(phi3.dir), device="cpu", max_model_len=64,
                                 block_size=8))
    assert eng.cache_stats()["kv"]["prefix_caching"] is False
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    eng.generate([LONG, LONG + "!"], sp, use_tqdm=False)
    assert eng.cache_stats()["kv"]["prefix_hit_tokens"] == 0


@pytest.mark.parametrize("mixed", [True, False])
def test_phi3_long_prompts_in_chunks_use_the_long_factors_from_their_first_chunk(phi3, mixed):
    # chunks of 16 tokens: the first ones end below the original 32 positions, yet the
    # prompt reaches past them, so HF rotates all its keys with the long factors
    rows = [("one", LONG), (None, SHORT[0]), ("two", LONG + "!")]
    check_matches_peft(phi3, rows, max_num_batched_tokens=16, mixed_steps=mixed)
