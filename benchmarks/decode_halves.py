"""Time the LoRA decode path's two launches apart: the whole add_lora call, the shrink launch
alone and the expand launch alone (each alone in a CUDA graph), at the goal shape.

Prints one JSON object per projection and decode config, in µs per call. The launches are
picked by wrapping the decode kernel so that only launches of one PHASE run; the expand alone
then reads whatever the workspace holds, so its output is not checked, only its time.
Usage: python benchmarks/decode_halves.py [--projections gate_up] [--decode-config default
       "wide.max_split_k=16"] [--tokens 64] [--adapters 32] [--rank 16]
"""
from __future__ import annotations

import argparse
import json
import sys

import lora_kernels as bench
import torch

from lorry.kernels import lora_decode
from lorry.kernels.backends import get_lora_ops

KERNEL = lora_decode.lora_decode_kernel


class _OnlyPhase:
    """Stands in for the decode kernel: launches with PHASE == phase run, others are dropped."""

    def __init__(self, phase: int | None):
        self.phase = phase

    def __getitem__(self, grid):
        launch = KERNEL[grid]

        def run(*args, **kwargs):
            if self.phase is None or kwargs.get("PHASE") == self.phase:
                launch(*args, **kwargs)
        return run


def halves(proj: str, spec: str, T: int, n_adapters: int, rank: int) -> dict:
    H, widths = bench.PROJECTIONS[proj]
    offsets, meta, x, y, weights = bench.lora_problem(
        proj, T, n_adapters, rank, bench.rotation_sets(proj, n_adapters, rank))
    tri = get_lora_ops("triton")
    lora_decode.DECODE_CONFIG = bench.parse_decode_config(spec)
    row = {"proj": proj, "config": spec, "tokens": T, "adapters": n_adapters, "rank": rank,
           "decode_path": lora_decode.decode_plan(T, n_adapters, H, rank, widths,
                                                  torch.device("cuda")) is not None}
    try:
        for name, phase in (("full_us", None), ("shrink_us", 1), ("expand_us", 2)):
            lora_decode.lora_decode_kernel = _OnlyPhase(phase)
            row[name] = round(bench._graph_time_us(
                [lambda a=a, b=b: tri.add_lora(y, x, a, b, meta, offsets) for a, b in weights],
                reps=30), 3)
    finally:
        lora_decode.lora_decode_kernel = KERNEL
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--projections", nargs="+", default=list(bench.PROJECTIONS))
    p.add_argument("--decode-config", nargs="+", default=["default"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "benchmarks/decode_halves.py needs a CUDA GPU"}))
        sys.exit(1)
    for spec in args.decode_config:
        for proj in args.projections:
            print(json.dumps(halves(proj, spec, args.tokens, args.adapters, args.rank)),
                  flush=True)


if __name__ == "__main__":
    main()
