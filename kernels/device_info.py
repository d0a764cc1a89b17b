"""Facts about the device that launch heuristics of every Triton kernel here share."""
from __future__ import annotations

import os

import torch

_SM_COUNT: dict[int, int] = {}


def interpreted() -> bool:
    """Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 8 for the CPU interpreter."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Programmatic dependent launch (Hopper and newer): a LoRA expand launch starts while its
# shrink finishes and waits in-kernel (griddepcontrol) before reading the shrink's output.
# benchmarks/kernels.py --pdl off turns it off to measure the difference.
PDL = {"enabled": False}   # measured: no gain on the H200 (docs/BENCHMARKS.md)
_PDL_OK: dict[int, bool] = {}


def use_pdl(device: torch.device) -> bool:
    """Launch the LoRA kernel pairs with programmatic dependent launch on this device."""
    if device.type != "cuda" or interpreted() or not PDL["enabled"]:
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        import triton.language as tl
        _PDL_OK[idx] = (torch.cuda.get_device_capability(idx)[0] >= 9
                        and hasattr(tl.extra.cuda, "gdc_wait"))
    return _PDL_OK[idx]
