"""Read a validated adapter's tensors into CPU memory, scaling folded into B."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import AdapterFormatError
from engine.lora.spec import AdapterSpec, check_shapes


@dataclass
class AdapterWeights:
    """CPU tensors of one adapter: (layer, module) -> (A [r, in], B*scaling [out, r])."""

    spec: AdapterSpec
    tensors: dict
    nbytes: int


def load_adapter_weights(spec: AdapterSpec, base_config: dict, max_lora_rank: int,
                         dtype: torch.dtype, pin_memory: bool) -> AdapterWeights:
    """Load the weights file (safetensors, or .bin with ``weights_only=True``) of ``spec``."""
    path = spec.weights_file
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:  # never unpickle arbitrary objects: tensors and plain containers only
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
                raise ValueError("expected a dict of tensors")
            check_shapes(spec, {k: (None, tuple(v.shape)) for k, v in raw.items()},
                         base_config, max_lora_rank)
    except AdapterFormatError:
        raise
    except Exception as e:  # corrupt data, refused pickle content, I/O errors  # noqa: BLE001
        raise AdapterFormatError(f"adapter {spec.path}: cannot read {path.name}: "
                                 f"{type(e).__name__}: {e}") from None
    tensors, nbytes = {}, 0
    for key, (a_name, b_name, _r, scaling, transposed) in spec.modules.items():
        a, b = raw[a_name].float(), raw[b_name].float()
        if transposed:
            a, b = a.t(), b.t()
        a, b = a.to(dtype).contiguous(), (b * scaling).to(dtype).contiguous()
        if pin_memory:
            a, b = a.pin_memory(), b.pin_memory()
        tensors[key] = (a, b)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return AdapterWeights(spec, tensors, nbytes)
