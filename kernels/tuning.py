"""Per-GPU launch settings of the Triton LoRA kernels, read from JSON files.

``kernels/configs/<GPU name>.json`` (the name as ``torch.cuda.get_device_name`` gives it, each
run of characters other than letters and digits as one ``_``: ``NVIDIA_H200.json``) holds the
settings measured on that GPU; ``default.json`` serves every other GPU and the CPU
interpreter. Each file has a ``decode`` table (the decode launch, see
``lorry.kernels.lora_decode.decode_plan``) and a ``fold`` table (entries over ``decode`` for the
expand alone over folded products) and a ``prompt`` table (the two-launch shrink and expand
kernels that take prompt steps: ``lorry.kernels.triton_lora.prompt_plan``). How a table was
found is in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import functools
import json
import re
from importlib import resources

import torch

DEFAULT = "default"


def config_name(gpu_name: str) -> str:
    """The file stem for a GPU name: ``"NVIDIA H200"`` -> ``"NVIDIA_H200"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_")


@functools.cache
def load(name: str) -> dict:
    """The tables of ``configs/<name>.json``, or of ``default.json`` when there is none."""
    configs = resources.files("lorry.kernels").joinpath("configs")
    path = configs.joinpath(f"{name}.json")
    if not path.is_file():
        path = configs.joinpath(f"{DEFAULT}.json")
    data = json.loads(path.read_text())
    return {"decode": data["decode"], "fold": data["fold"], "prompt": data["prompt"]}


@functools.cache
def _device_name(index: int) -> str:
    return config_name(torch.cuda.get_device_name(index))


def for_device(device: torch.device) -> dict:
    """The tables for ``device`` (its GPU's file; the default one off CUDA)."""
    if device.type != "cuda":
        return load(DEFAULT)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return load(_device_name(index))
