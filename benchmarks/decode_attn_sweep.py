"""The paged flash-decode attention kernel at a bulk decode step, per launch setting (JSON).

A decode step of ``benchmarks/bulk.py`` (256 rows, Llama-3-8B heads, blocks of 16, tables
as wide as its max_model_len of 5,120) gives each row one query over its own keys: prompts
log-normal (median 400, at most 4,000), 30% after a shared prefix of 500-1,500 tokens, plus
up to 150 answer tokens so far (mean ~1,000 keys, the longest ~5,500). By default one program
per (row, KV head) walks all of a row's keys: at 2,048 programs the chip is full, but the
longest rows run alone at the end. This times 32 calls (a step's layers) per setting: sequence
splits (each split a program; splits past a row's keys store nothing), keys per tile, warps
and pipeline stages, checks each against the default's output, and prints ms a step, the
keys' and values' GB/s and the fastest. ``--kv-cache-dtype fp8`` times it over an e4m3
cache (widened per tile; ``--bf16-dots`` widens to bf16 rather than fp16) and the 16-bit
cache's current setting beside it, on the same rows; ``--quick`` a smaller grid.

    PYTHONPATH=. python benchmarks/decode_attn_sweep.py [--rows 256] [--repeats 10]
        [--kv-cache-dtype fp8 [--bf16-dots]] [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np
import torch
from prefill_attn_sweep import random_paged  # benchmarks/: paged caches of random values
from prefill_step import _timer  # benchmarks/: median of CUDA-event timings

from lorry.kernels import decode_attention as da
from lorry.kernels import paged_tiles
from lorry.kernels.launch_math import next_pow2


def lengths(rows: int, seed: int) -> list[int]:
    """Keys per row at a bulk decode step (see the module docstring)."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(np.log(400), 0.8, rows), 50, 4000)
    prefix = np.where(rng.random(rows) < 0.3, rng.integers(500, 1501, rows), 0)
    return [int(x) for x in prompt + prefix + rng.integers(1, 151, rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=5120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a check of this script under TRITON_INTERPRET=1 (fp32)")
    ap.add_argument("--kv-cache-dtype", default=None, choices=[None, "fp8"])
    ap.add_argument("--bf16-dots", action="store_true",
                    help="an fp8 cache widened to bf16 (paged_tiles.FP8_DOTS_IN_FP16 off)")
    ap.add_argument("--quick", action="store_true",
                    help="splits default/2/4, keys a tile 64/128/256, 4 or 8 warps, 2 or 3 stages")
    ap.add_argument("--grid", nargs=4, default=None, metavar=("SPLITS", "BLOCK_N", "WARPS",
                                                               "STAGES"),
                    help="the grid as comma lists, e.g. 0,2 64,128 1,2,4 2,3 (splits 0: the "
                         "engine's)")
    args = ap.parse_args()
    dev, bs, h, kvh, D = args.device, 16, 32, 8, 128
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    n = [min(k, args.max_model_len) for k in lengths(args.rows, args.seed)]
    width = -(-args.max_model_len // bs)
    need = [-(-k // bs) for k in n]
    g = torch.Generator(device=dev).manual_seed(args.seed)
    tables, kc, vc = random_paged(need, width, kvh, D, bs, dt, dev, g)
    q = torch.randn(args.rows, h * D, device=dev, dtype=dt, generator=g)
    pos = torch.tensor([k - 1 for k in n], dtype=torch.int32, device=dev)
    wide = (kc, vc)                               # the 16-bit cache, timed beside an fp8 one
    if args.kv_cache_dtype == "fp8":
        kc, vc = (x.mul(3).to(torch.float8_e4m3fn) for x in (kc, vc))
    if args.bf16_dots:
        paged_tiles.FP8_DOTS_IN_FP16 = False
    kv_bytes = sum(n) * kvh * D * 2 * kc.dtype.itemsize * args.layers
    saved = (da.BLOCK_N, da.NUM_WARPS, da.NUM_STAGES)
    block_n, stages = da.launch_for(next_pow2(D), kc.dtype, q.device, width * bs)  # the engine's
    default = (None, block_n, da.NUM_WARPS, stages)
    chosen = da.num_splits(args.rows, kvh, width * bs, q.device)

    def step(splits, caches=None):
        k, v = caches or (kc, vc)
        for _ in range(args.layers):
            out = da.decode_attention(q, k, v, tables, pos, bs, splits)
        return out

    ref = step(None)
    if args.grid:
        lists = [[int(v) for v in x.split(",")] for x in args.grid]
        lists[0] = [v or None for v in lists[0]]
        grid = itertools.product(*lists)
    elif args.quick:
        grid = itertools.product((None, 2, 4), (64, 128, 256), (4, 8), (2, 3))
    else:
        grid = itertools.product((None, 2, 4, 8, 16), (32, 64, 128, 256), (4, 8), (2, 3, 4))
    configs = [default] + [c for c in grid if c != default]
    results = []
    for cfg in configs:
        da.BLOCK_N, da.NUM_WARPS, da.NUM_STAGES = cfg[1:]
        row = {"splits": cfg[0] or chosen, "block_n": cfg[1], "num_warps": cfg[2],
               "num_stages": cfg[3]}
        try:
            out = step(cfg[0])
            if dev == "cuda":
                torch.cuda.synchronize()
            row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
            ms = _timer(dev, lambda: step(cfg[0]), args.repeats)
            row["ms_per_step"] = ms
            row["kv_gb_per_s"] = round(kv_bytes / ms / 1e6, 1)
        except Exception as e:  # out of shared memory or registers for this setting
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        results.append(row)
        print(json.dumps(row), flush=True, file=sys.stderr)
    da.BLOCK_N, da.NUM_WARPS, da.NUM_STAGES = saved
    wide_ms = None
    if kc.dtype != dt:   # the 16-bit cache at its own current setting, the same rows
        step(None, wide)
        wide_ms = _timer(dev, lambda: step(None, wide), args.repeats)
    ok = [r for r in results if "ms_per_step" in r and r["max_abs_diff"] < 0.05]
    best = min(ok, key=lambda r: r["ms_per_step"]) if ok else None
    top = sorted(ok, key=lambda r: r["ms_per_step"])[:10]
    same = [r for r in ok if (r["block_n"], r["num_warps"], r["num_stages"]) == default[1:]]
    splits_only = min(same, key=lambda r: r["ms_per_step"]) if same else None
    print(json.dumps({"benchmark": "decode_attn_sweep", "date": time.strftime("%Y-%m-%d"),
                      "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
                      "torch": torch.__version__,
                      "rows": args.rows, "keys": {"mean": round(sum(n) / len(n), 1),
                                                  "max": max(n), "sum": sum(n)},
                      "table_keys": width * bs, "layers": args.layers,
                      "kv_cache_dtype": str(kc.dtype),
                      "fp8_dots_in_fp16": paged_tiles.FP8_DOTS_IN_FP16,
                      "wide_cache_default_ms": wide_ms,
                      "kv_gb_per_step": round(kv_bytes / 1e9, 2), "default": results[0],
                      "best": best, "best_splits_at_default_launch": splits_only,
                      "top": top,
                      "speedup": round(results[0]["ms_per_step"] / best["ms_per_step"], 3)
                      if best else None, "results": results}, indent=2))


if __name__ == "__main__":
    main()
