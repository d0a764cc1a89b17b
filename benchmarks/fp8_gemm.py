"""The base GEMMs of a decode step, bf16 against fp8 (prints JSON): Llama-3-8B's four fused
linears at M = 8..512 rows, over 8 layers' worth of weights (so L2 does not serve them), as
F.linear in bf16, torch._scaled_mm with row-wise scales (per-token input x per-channel
weight: engine.quant.onthefly.Fp8Linear's GEMM, a CUTLASS kernel in torch) and with one
scale per tensor (cuBLASLt) and kernels.fp8_matmul (Triton, its default config); plus the
input quantization of Fp8Linear. Times are GPU time per GEMM from CUDA-graph replays;
tb_per_s is the weight read over that time. --sweep also times kernels.fp8_matmul over a grid
of tile configs at --sweep-rows and prints each shape's best (the table config_for keeps).
Usage: python3 benchmarks/fp8_gemm.py [--rows 8 64 256] [--sweep] [--out fp8_gemm.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# Llama-3-8B: (out, in) of qkv, o, gate_up, down
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
LAYERS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 64, 128, 256, 512])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-rows", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--sweep-quick", action="store_true", help="a smaller grid of configs")
    args = ap.parse_args()
    import torch
    from triton.testing import do_bench_cudagraph

    from lorry.engine.quant.onthefly import FP8, Fp8Linear
    from lorry.kernels import fp8_matmul as fm

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "gemms": {}}
    one = torch.ones((), device=dev)
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
              for _ in range(LAYERS)]
        ops = [Fp8Linear(w, None) for w in ws]
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
            xq, s = ops[0].quantize_input(x)
            xt = x.float().div(x.float().abs().amax() / 448).to(FP8)
            cases = {
                "bf16_linear": lambda: [torch.nn.functional.linear(x, w) for w in ws],
                "fp8_rowwise": lambda: [torch._scaled_mm(xq, op.qweight.t(), s, op.scale,
                                                         out_dtype=torch.bfloat16) for op in ops],
                "fp8_tensorwise": lambda: [torch._scaled_mm(xt, op.qweight.t(), one, one,
                                                            out_dtype=torch.bfloat16)
                                           for op in ops],
                "fp8_triton": lambda: [fm.fp8_matmul(xq, s, op.qweight, op.scale)
                                       for op in ops],
                "fp8_op": lambda: [op(x) for op in ops],
            }
            row = {}
            for case, fn in cases.items():
                try:
                    us = do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3 / LAYERS
                except Exception as e:  # noqa: BLE001 - a case torch cannot run is reported
                    row[case] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                nbytes = n * k * (2 if case == "bf16_linear" else 1)
                row[case] = {"us": round(us, 1), "tb_per_s": round(nbytes / us / 1e6, 2)}
            row["quantize_input_us"] = round(do_bench_cudagraph(
                lambda: ops[0].quantize_input(x), rep=60, return_mode="median") * 1e3, 1)
            res["gemms"][f"{name}_m{m}"] = row
            print(name, m, row, flush=True)
        if args.sweep:
            res.setdefault("sweep", {}).update(sweep(fm, ops, n, k, name, args.sweep_rows,
                                                     args.sweep_quick))
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def sweep(fm, ops, n: int, k: int, name: str, rows: list[int], quick: bool = False) -> dict:
    """kernels.fp8_matmul over a grid of configs at each of ``rows``: {shape_m: best first}."""
    import itertools

    import torch
    from triton.testing import do_bench_cudagraph

    out = {}
    dev = ops[0].qweight.device
    for m in rows:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, s = ops[0].quantize_input(x)
        times = []
        # row tiles: the default's, 64, and for wide M one tile of 128 / 256 rows (the weight
        # read once); --sweep-quick: a smaller grid
        bms = sorted({16 if m <= 16 else 32 if m <= 32 else 64, 64}
                     | ({128, 256} if m >= 128 else set()))
        grid = (((32, 64), (128,), ((4, 4), (8, 4))) if quick else
                ((32, 64, 128), (128, 256), ((4, 3), (4, 4), (4, 6), (8, 4))))
        for bm, bn, bk, (warps, stages) in itertools.product(bms, *grid):
            fm.CONFIG = (bm, bn, bk, warps, stages)
            try:
                us = do_bench_cudagraph(lambda: [fm.fp8_matmul(xq, s, op.qweight, op.scale)
                                                 for op in ops], rep=25,
                                        return_mode="median") * 1e3 / LAYERS
            except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                print("skip", fm.CONFIG, type(e).__name__, flush=True)
                continue
            times.append((round(us, 1), fm.CONFIG, round(n * k / us / 1e6, 2)))
        fm.CONFIG = ()
        times.sort()
        out[f"{name}_m{m}"] = [{"us": t, "config": c, "tb_per_s": b} for t, c, b in times[:5]]
        print("sweep", name, m, out[f"{name}_m{m}"][:3], flush=True)
    return out


if __name__ == "__main__":
    main()
