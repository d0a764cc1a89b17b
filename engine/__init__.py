"""Lorry's multi-LoRA engine: one base model, many adapters per batch (vLLM-shaped API).

Exports are lazy (PEP 562) so that torch-free submodules such as ``engine.lora.spec`` can be
imported without importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLMEngine": "lorry.engine.llm_engine",
    "EngineConfig": "lorry.engine.config",
    "SamplingParams": "lorry.engine.sampling_params",
    "LoRARequest": "lorry.engine.lora.request",
    "RequestOutput": "lorry.engine.outputs",
    "CompletionOutput": "lorry.engine.outputs",
    "RequestMetrics": "lorry.engine.outputs",
    "Logprob": "lorry.engine.outputs",
    "LoRAError": "lorry.engine.errors",
}

__all__ = [
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "LoRAError",
    "LoRARequest",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
