"""The LoRA ops backends (a pure-torch reference and the Triton kernels), chosen by name.

``lorry.kernels`` is a namespace package on purpose: the repository's top-level ``kernels/``
folder has no ``__init__.py``, so it can never shadow Hugging Face's ``kernels`` package
(which transformers imports) when the repository root is on ``sys.path``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_BACKENDS = {"torch": "lorry.kernels.torch_ref", "triton": "lorry.kernels.triton_lora"}


def get_lora_ops(name: str) -> ModuleType:
    """Return the LoRA ops module of a backend ("torch" or "triton").

    The module has ``lora_shrink``, ``lora_expand`` and ``add_lora`` with the signatures of
    ``kernels.torch_ref``. Triton is imported only when the "triton" backend is asked for.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {sorted(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[name])
