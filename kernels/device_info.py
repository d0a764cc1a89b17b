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


_SMEM: dict[int, int] = {}


def max_shared_mem(device: torch.device) -> int:
    """Bytes of shared memory one program may opt in to on a CUDA device (cached, as Triton
    reads it); 0 for the CPU interpreter, which has no such limit to plan for."""
    if device.type != "cuda" or interpreted():
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM:
        import triton
        props = triton.runtime.driver.active.utils.get_device_properties(idx)
        _SMEM[idx] = int(props["max_shared_mem"])
    return _SMEM[idx]


_PDL_OK: dict[int, bool] = {}


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol) works here: a Hopper or newer GPU and a
    Triton that has it; never on the CPU interpreter."""
    if device.type != "cuda" or interpreted():
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        import triton.language as tl
        _PDL_OK[idx] = (torch.cuda.get_device_capability(idx)[0] >= 9
                        and hasattr(tl.extra.cuda, "gdc_wait"))
    return _PDL_OK[idx]
