"""The LoRA ops protocol and its backends, chosen by name in one selector.

Backends: "reference" (``lorry.kernels.torch_ref``, plain loops: what the others are tested
against), "torch" (``lorry.kernels.dense_ops``, vectorised torch: the engine's CPU backend)
and "triton" (``lorry.kernels.triton_lora``, the CUDA kernels; it also has
``add_lora_folded``). Triton is imported only when the "triton" backend is asked for.

``lorry.kernels`` is a namespace package on purpose: the repository's top-level ``kernels/``
folder has no ``__init__.py``, so it can never shadow Hugging Face's ``kernels`` package
(which transformers imports) when the repository root is on ``sys.path``.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import torch

from lorry.kernels.segments import LoRAMeta

BACKENDS = {"reference": "lorry.kernels.torch_ref", "torch": "lorry.kernels.dense_ops",
            "triton": "lorry.kernels.triton_lora"}


class LoRAOps(Protocol):
    """What every backend module provides (shapes as in docs/INTERFACES.md, "kernels")."""

    def lora_shrink(self, x: torch.Tensor, lora_a: list[torch.Tensor], meta: LoRAMeta,
                    out: torch.Tensor) -> None:
        """out[s, t] = x[t] @ A_s[slot(t)]ᵀ for each slice s (rows of slot -1 untouched)."""

    def lora_expand(self, inter: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAMeta,
                    y: torch.Tensor, slice_offsets: list[int]) -> None:
        """y[t, slice s] += inter[s, t] @ B_s[slot(t)]ᵀ."""

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
                 lora_b: list[torch.Tensor], meta: LoRAMeta, slice_offsets: list[int],
                 buffer: torch.Tensor | None = None) -> None:
        """y[:, slices] += LoRA(x): the shrink then the expand."""


def get_lora_ops(name: str) -> LoRAOps:
    """The ops of a backend: "reference", "torch" or "triton"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])
