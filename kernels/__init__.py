"""Multi-adapter LoRA ops: a pure-torch reference and Triton kernels, chosen by name."""
from __future__ import annotations

import importlib
from types import ModuleType

_BACKENDS = {"torch": "kernels.torch_ref", "triton": "kernels.triton_lora"}


def get_lora_ops(name: str) -> ModuleType:
    """Return the LoRA ops module of a backend ("torch" or "triton").

    The module has ``lora_shrink``, ``lora_expand`` and ``add_lora`` with the signatures of
    ``kernels.torch_ref``. Triton is imported only when the "triton" backend is asked for.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {sorted(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[name])
