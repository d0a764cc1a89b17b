"""Kernel tuning as data: kernels/configs/<GPU>.json per GPU, default.json for any other."""
from __future__ import annotations

import json
from importlib import resources

import torch

from lorry.kernels import lora_decode, tuning


def test_each_gpu_gets_its_own_file_and_others_the_default():
    assert tuning.config_name("NVIDIA H200") == "NVIDIA_H200"
    assert tuning.config_name("NVIDIA GeForce RTX 4090") == "NVIDIA_GeForce_RTX_4090"
    files = resources.files("lorry.kernels").joinpath("configs")
    h200 = json.loads(files.joinpath("NVIDIA_H200.json").read_text())
    assert tuning.load("NVIDIA_H200")["decode"] == h200["decode"]
    assert tuning.load("NVIDIA_A10G") == tuning.load("default")  # no file: the default one
    default = tuning.load("default")
    assert set(default["decode"]) == set(h200["decode"])  # every key has a default
    assert set(default["prompt"]) == set(h200["prompt"])


def test_the_plan_follows_the_table_and_an_override_wins(monkeypatch):
    cpu = torch.device("cpu")
    widths = [4096, 1024, 1024]
    assert lora_decode.decode_plan(64, 32, 4096, 16, widths, cpu) is not None
    closed = dict(tuning.for_device(cpu)["decode"], max_tokens=32)
    monkeypatch.setattr(lora_decode, "DECODE_CONFIG", closed)
    assert lora_decode.decode_plan(64, 32, 4096, 16, widths, cpu) is None
    assert lora_decode.decode_plan(32, 32, 4096, 16, widths, cpu) is not None


def test_prompt_steps_take_the_long_tiles_and_max_tokens_0_closes_them(monkeypatch):
    # the bulk workload's prompt step: 3,507 tokens over 96 adapter ids, rank 64, q/k/v
    cpu = torch.device("cpu")
    widths = [4096, 1024, 1024]
    plan = lora_decode.decode_plan(3507, 96, 4096, 64, widths, cpu)
    assert plan is not None and plan["rows"] == 16
    # past 128 tokens a slot on average (a long prompt of few adapters): the two-launch kernels
    assert lora_decode.decode_plan(3507, 16, 4096, 64, widths, cpu) is None
    off = dict(tuning.for_device(cpu)["decode"], max_tokens=0)
    monkeypatch.setattr(lora_decode, "DECODE_CONFIG", off)
    assert lora_decode.decode_plan(3507, 96, 4096, 64, widths, cpu) is None
    assert lora_decode.decode_plan(64, 32, 4096, 16, widths, cpu) is None


def test_the_long_bound_counts_the_tokens_an_eager_step_gives_each_slot():
    from lorry.engine.runner import ModelRunner
    from lorry.kernels.segments import build_lora_meta

    cpu = torch.device("cpu")
    widths = [4096, 1024, 1024]
    # one adapter's 3,507-token prompt among 96 ids: 3,507 tokens in one slot, past the long
    # tiles' 128 a slot (each tile would read the adapter again): the two-launch kernels
    assert lora_decode.decode_plan(3507, 96, 4096, 64, widths, cpu, None, 3507) is None
    assert lora_decode.decode_plan(3507, 96, 4096, 64, widths, cpu, None, 52) is not None
    assert build_lora_meta(torch.zeros(3, dtype=torch.int32), 96).tokens_per_slot is None
    # the runner gives an eager step's meta the adapter tokens over the slots holding them
    # (known on the host; tokens without an adapter read no adapter and do not count)
    runner = ModelRunner(None, object(), 96, cpu)
    step = runner._lora([5, 5, -1, 7, 5, 9, -1, -1, 7])
    assert step.meta.tokens_per_slot == 6 // 3
