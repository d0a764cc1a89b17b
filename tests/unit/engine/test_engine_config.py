"""EngineConfig and SamplingParams refuse bad values with messages naming value and allowed set."""
from __future__ import annotations

import pytest

from lorry.engine import EngineConfig, LoRARequest, SamplingParams


@pytest.mark.parametrize("kwargs, words", [
    ({"max_lora_rank": 7}, r"max_lora_rank=7 .*allowed \[1, 8, 16"),
    ({"max_loras": 4, "max_cpu_loras": 2}, r"max_cpu_loras=2 .*>= max_loras \(4\)"),
    ({"max_loras": 0}, r"max_loras=0 .*>= 1"),
    ({"max_num_seqs": -1}, "max_num_seqs=-1"),
    ({"dtype": "fp8"}, r"dtype='fp8' .*allowed"),
    ({"lora_backend": "cuda"}, r"lora_backend='cuda'"),
    ({"load_format": "gguf"}, r"load_format='gguf'"),
    ({"model": ""}, "model=''"),
])
def test_engine_config_refusals(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(**{"model": "m", **kwargs})


def test_engine_config_defaults():
    c = EngineConfig(model="m", max_loras=3)
    assert c.max_cpu_loras == 3  # the CPU cache holds at least what the GPU slots hold
    assert (c.dtype, c.device, c.lora_backend, c.lora_dtype, c.load_format) == (
        "auto", "auto", "auto", "auto", "auto")
    assert (c.enable_lora, c.enforce_eager, c.lora_fold, c.quantization) == (
        True, False, True, None)
    assert (c.max_lora_rank, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == (
        16, 64, 8192, None)
    assert EngineConfig(model="m", max_loras=3, max_cpu_loras=8).max_cpu_loras == 8


@pytest.mark.parametrize("kwargs, words", [
    ({"max_tokens": 0}, "max_tokens=0"), ({"temperature": -1}, "temperature=-1"),
    ({"top_p": 0}, "top_p=0"), ({"top_k": -2}, "top_k=-2"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": "x"}, "seed='x'"),
])
def test_sampling_params_refusals(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_sampling_params_from_dict():
    sp = SamplingParams.from_dict({"max_tokens": 4, "stop": "\n", "seed": 1})
    assert sp.stop_list == ["\n"] and sp.max_tokens == 4
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['n_best'\]"):
        SamplingParams.from_dict({"n_best": 2})
    assert SamplingParams.from_dict(sp.to_dict()) == sp


def test_lora_request_validation():
    with pytest.raises(ValueError, match="lora_int_id must be a positive int"):
        LoRARequest("a", 0, "/p")


def test_triton_backend_needs_cuda(tiny_llama):
    from lorry.engine import LLMEngine

    # device="cpu" explicitly: the refusal holds on GPU machines too
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLMEngine(EngineConfig(model=str(tiny_llama.dir), device="cpu", lora_backend="triton"))
