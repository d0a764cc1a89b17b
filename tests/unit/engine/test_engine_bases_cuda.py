"""Every supported base on the GPU path: CUDA graphs, the fold and each LoRA backend (torch,
Triton) give PEFT's greedy tokens and logits (fp32, within 1e-4) for a mixed batch, and bf16
logits stay within 1.5x transformers' own bf16 error. Runs only with CUDA."""
from __future__ import annotations

import copy

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from tests.unit.engine.conftest import peft_greedy
from tests.unit.engine.test_engine_bases import ATTN_MLP, LONG, MIXED, SHORT, SMALL, Base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _config(name: str):
    import transformers as tf

    two = {"num_hidden_layers": 2}
    if name == "qwen3":
        return tf.Qwen3Config(**SMALL, **two, head_dim=24, tie_word_embeddings=True)
    if name == "gemma2":
        return tf.Gemma2Config(**SMALL, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                               sliding_window=8, attn_logit_softcapping=2.0,
                               final_logit_softcapping=3.0)
    if name == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
        return tf.Gemma3TextConfig(**SMALL, num_hidden_layers=3, head_dim=16,
                                   query_pre_attn_scalar=32, sliding_window=8,
                                   layer_types=["sliding_attention", "sliding_attention",
                                                "full_attention"],
                                   final_logit_softcapping=5.0, rope_parameters=rope)
    if name == "phi3":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.2, 1.8, 2.6, 3.5, 4.5, 6.0],
                "original_max_position_embeddings": 32}
        return tf.Phi3Config(**{**SMALL, "max_position_embeddings": 128}, **two,
                             rope_parameters=rope, original_max_position_embeddings=32,
                             partial_rotary_factor=0.75)
    if name == "mistral_window":
        return tf.MistralConfig(**SMALL, **two, sliding_window=8)
    if name == "qwen2_yarn":
        return tf.Qwen2Config(**{**SMALL, "max_position_embeddings": 128}, **two,
                              rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                               "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 32})
    if name == "granite":
        return tf.GraniteConfig(**SMALL, **two, embedding_multiplier=6.0, residual_multiplier=0.4,
                                attention_multiplier=0.5, logits_scaling=3.0)
    assert name == "olmo2"
    return tf.Olmo2Config(**SMALL, **two)


NAMES = ["qwen3", "gemma2", "gemma3", "phi3", "mistral_window", "qwen2_yarn", "granite", "olmo2"]
# phi3 switches longrope factors at its original context, as HF does per sequence length:
# short rows and long rows run as separate batches (see test_engine_bases)
PHI3_ROWS = ([("one", SHORT[0]), (None, SHORT[2]), ("two", SHORT[3]), ("one", "ab cd ef")],
             [("one", LONG), (None, LONG[::-1]), ("two", LONG + "!")])


@pytest.fixture(scope="module", params=NAMES)
def base(request, tmp_path_factory):
    targets = ((("qkv_proj", "gate_up_proj"), "all-linear") if request.param == "phi3"
               else ("all-linear", ATTN_MLP))
    noise = 0.0 if request.param in ("phi3", "mistral_window", "qwen2_yarn") else 0.3
    b = Base(tmp_path_factory.mktemp(request.param), _config(request.param), targets,
             norm_noise=noise)
    b.rows = PHI3_ROWS if request.param == "phi3" else (MIXED,)
    return b


def _generate(base: Base, rows, **kw):
    """One batch of ``rows``; each output with the logits that chose its tokens."""
    eng = LLMEngine(EngineConfig(model=str(base.dir), max_loras=2, max_lora_rank=8,
                                 max_num_seqs=8, max_model_len=128, **kw))
    captured = {}
    eng.runner.logits_hook = lambda seqs, lg: [captured.setdefault(s.request_id, []).append(
        r.float().cpu()) for s, r in zip(seqs, lg)]
    reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(base.adapters.items())}
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = eng.generate([p for _, p in rows], sp, [reqs[n] if n else None for n, _ in rows],
                        use_tqdm=False)
    return eng, [(o, torch.stack(captured[o.request_id])) for o in outs]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_mixed_batch_matches_peft_fp32(base, backend, monkeypatch):
    from lorry.engine.lora import slot_layout

    monkeypatch.setattr(slot_layout, "FOLD_MAX_EXTRA", 100.0)   # tiny layers: fold them all
    for rows in base.rows:
        eng, outs = _generate(base, rows, device="cuda", dtype="float32", lora_backend=backend)
        assert eng.runner.graphs is not None and eng.runner.graphs.captures >= 1
        for (out, logits), (name, _) in zip(outs, rows):
            tokens, want = peft_greedy(base.peft, out.prompt_token_ids, 8, name)
            assert out.outputs[0].token_ids == tokens, f"row with adapter {name}"
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float().cpu() - ref).norm() / ref.norm())


def test_gpu_bf16_logits_within_transformers_bf16_error(base):
    prompts = [[5, 9, 33, 7, 81, 2, 14, 60, 61, 62], [40, 41, 42, 43]]
    reqs = [LoRARequest("one", 1, str(base.adapters["one"])), None]
    cpu = LLMEngine(EngineConfig(model=str(base.dir), device="cpu", dtype="float32",
                                 max_loras=2, max_lora_rank=8, max_model_len=64))
    gpu = LLMEngine(EngineConfig(model=str(base.dir), device="cuda", dtype="bfloat16",
                                 max_loras=2, max_lora_rank=8, max_model_len=64))
    ref, got = cpu.compute_logits(prompts, reqs), gpu.compute_logits(prompts, reqs)
    hf16 = copy.deepcopy(base.peft).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p, lr, r, g in zip(prompts, reqs, ref, got):
            names = ["one" if lr else "__base__"]
            want = base.peft(torch.tensor([p]), adapter_names=names).logits[0]
            torch.testing.assert_close(r, want, atol=1e-4, rtol=1e-4)   # fp32 engine == PEFT
            hf = hf16(torch.tensor([p], device="cuda"), adapter_names=names).logits[0]
            assert _rel(g, want) <= 1.5 * _rel(hf, want) + 1e-3, (names, _rel(g, want),
                                                                   _rel(hf, want))
