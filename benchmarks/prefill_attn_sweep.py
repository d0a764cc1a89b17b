"""Launch settings of the paged prefill attention kernel, timed at a bulk prompt step (JSON).

One mixed prompt step of ``benchmarks/bulk.py`` on the H100 (prefill_step.py, step 150) puts
5,079 prompt tokens of 8 rows through ``kernels.prefill_attention`` on each of Llama-3-8B's
32 layers: 15.6 ms of the step. This times the kernel at such a step (Llama-3-8B heads,
blocks of 16, rows of 1,500..100 queries, three after cached prefixes) for each
(BLOCK_M, BLOCK_N, num_warps, num_stages, MAX_PACK: query heads of one kv head a program
takes), checks each against the current setting's output, and prints ms, TFLOP/s (causal
pairs only) and the fastest; ``--kv-cache-dtype fp8`` over an e4m3 cache (widened per tile).

    PYTHONPATH=. python benchmarks/prefill_attn_sweep.py [--repeats 20] [--kv-cache-dtype fp8]
        [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from prefill_step import _timer  # benchmarks/: median of CUDA-event timings

from lorry.kernels import paged_tiles
from lorry.kernels import prefill_attention as pa

Q_LEN = [1500, 1000, 800, 600, 500, 379, 200, 100]
CTX = [0, 0, 900, 0, 1000, 0, 1200, 0]


def random_paged(need: list[int], width: int, kvh: int, D: int, bs: int, dtype, device,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables [rows, width] giving row b its need[b] blocks, shuffled over a cache of
    random keys and values ([slots, kvh, D] each) -> (tables, k_cache, v_cache)."""
    blocks = sum(need) + 8
    perm = torch.randperm(blocks, device=device, generator=g).to(torch.int32)
    tables = torch.zeros(len(need), width, dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[at:at + n]
        at += n
    kc = torch.randn(blocks * bs, kvh, D, device=device, dtype=dtype, generator=g)
    vc = torch.randn(blocks * bs, kvh, D, device=device, dtype=dtype, generator=g)
    return tables, kc, vc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-cache-dtype", default=None, choices=[None, "fp8"])
    ap.add_argument("--bf16-dots", action="store_true",
                    help="an fp8 cache widened to bf16 (paged_tiles.FP8_DOTS_IN_FP16 off)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="the current setting and the same with one query head a program only")
    ap.add_argument("--quick", action="store_true",
                    help="a smaller grid: 2 or 3 stages, BLOCK_N 32 or 64")
    args = ap.parse_args()
    dev, dt, bs = "cuda", torch.bfloat16, 16
    h, kvh, D = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    tq = sum(Q_LEN)
    need = [-(-(c + n) // bs) for c, n in zip(CTX, Q_LEN)]
    tables, kc, vc = random_paged(need, max(need), kvh, D, bs, dt, dev, g)
    if args.kv_cache_dtype == "fp8":
        kc, vc = (x.mul(3).to(torch.float8_e4m3fn) for x in (kc, vc))
    if args.bf16_dots:
        paged_tiles.FP8_DOTS_IN_FP16 = False
    q = torch.randn(tq, h * D, device=dev, dtype=dt, generator=g)
    starts = [sum(Q_LEN[:i]) for i in range(len(Q_LEN))]
    rows = torch.tensor([starts, Q_LEN, CTX], dtype=torch.int32, device=dev)
    pairs = sum(n * c + n * (n + 1) // 2 for n, c in zip(Q_LEN, CTX))
    flop = 4 * D * h * pairs

    def run():
        return pa.prefill_attention(q, kc, vc, tables, rows, max(Q_LEN), bs)

    def setting():
        return pa.launch_settings(kc.dtype)      # the cache's (an fp8 cache: pa.FP8_LAUNCH)

    def use(cfg):
        pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES, pa.MAX_PACK = cfg
        pa.FP8_LAUNCH = None                      # every cache takes the settings above

    default = setting()
    use(default[:4] + (1,))     # the reference: one query head a program
    ref = run()
    use(default)
    results = []
    grid = ((64, 128), (32, 64), (4, 8), (2, 3), (1, 2, 4)) if args.quick else \
        ((64, 128), (32, 64, 128), (4, 8), (1, 2, 3), (1, 2, 4, 8))
    configs = [default] + [c for c in itertools.product(*grid) if c != default]
    if args.no_sweep:
        configs = [default, default[:4] + (1,)]
    for cfg in configs:
        use(cfg)
        row = {"block_m": cfg[0], "block_n": cfg[1], "num_warps": cfg[2], "num_stages": cfg[3],
               "max_pack": cfg[4], "heads_packed": pa.heads_packed(h // kvh, cfg[0], cfg[4])}
        try:
            out = run()
            torch.cuda.synchronize()
            row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
            ms = _timer("cuda", run, args.repeats)
            row["ms"] = ms
            row["tflop_per_s"] = round(flop / ms / 1e9, 1)
        except Exception as e:  # out of shared memory or registers for this setting
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        results.append(row)
        print(json.dumps(row), flush=True, file=__import__("sys").stderr)
    use(default)
    ok = [r for r in results if "ms" in r and r["max_abs_diff"] < 0.05]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    print(json.dumps({"benchmark": "prefill_attn_sweep", "date": time.strftime("%Y-%m-%d"),
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "rows": {"q_len": Q_LEN, "ctx": CTX}, "heads": [h, kvh, D],
                      "kv_cache_dtype": args.kv_cache_dtype,
                      "fp8_dots_in_fp16": paged_tiles.FP8_DOTS_IN_FP16,
                      "causal_pairs_per_head": pairs, "default": results[0], "best": best,
                      "speedup": round(results[0]["ms"] / best["ms"], 3) if best else None,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
