"""Time the Triton LoRA kernels against the torch reference and a one-adapter dense roofline.

Llama-3-8B projection shapes in bf16 on a CUDA GPU; prints one JSON object per line and a
summary object last. Times are medians over CUDA-graph replays (eager for the reference).
Usage: python benchmarks/lora_kernels.py [--tokens 1 64 8192] [--adapters 32] [--ranks 16]
       [--projections qkv gate_up] [--quick] [--decode-config off "num_warps=8,expand_loop=1"]
--decode-config runs the ladder once per setting of the decode table (kernels/configs/)
("default", "off" = the two-launch path only, or key=value pairs over the defaults).
--layer times LoRA inside a layer, per projection at the goal shape: the base matmul alone,
base then LoRA, LoRA on a side stream beside the base matmul, and folded (the A slot rows under
the weight, as EngineConfig.lora_fold: one matmul, then add_lora_folded).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from lorry.kernels.backends import get_lora_ops
from lorry.kernels.segments import build_lora_meta

# name -> (input width, output widths of the fused slices)
PROJECTIONS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]),
               "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}
COPY_PEAK_GBS = 4300.0
ROTATE_BYTES = 240e6    # rotate weight copies past the 60 MB L2, as successive layers would


def _graph_time_us(fns, reps: int) -> float:
    """Median time per call of fns (run back to back) replayed in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def _eager_time_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    t = _eager_time_us(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * 4 / t / 1e3


def _pairs(spec: str) -> list[tuple[str, str]]:
    """'key=value,...' -> [(key, value), ...]"""
    return [tuple(item.split("=")) for item in spec.split(",")]


def _decode_defaults(device: str = "cuda") -> dict:
    """The decode table of ``device``'s file (kernels/configs/, lorry.kernels.tuning; the
    file's even while lora_decode.DECODE_CONFIG holds another)."""
    from lorry.kernels import tuning

    return dict(tuning.for_device(torch.device(device))["decode"])


def _override(base: dict, spec: str, device: str = "cuda") -> dict:
    """base with 'key=value,...' applied (integers; 'wide.key=value' / 'long.key=value' set
    an entry of those overrides), each key checked against the decode table's."""
    cfg, defaults = dict(base), _decode_defaults(device)
    for key, value in _pairs(spec):
        outer, _, inner = key.rpartition(".")
        if inner not in defaults or outer not in ("", "wide", "long") \
                or isinstance(defaults[inner], dict):
            raise SystemExit(f"unknown decode config key {key!r}; keys: "
                             f"{sorted(defaults)} (or wide.<key>, long.<key>)")
        if outer:
            cfg[outer] = dict(cfg.get(outer) or {}, **{inner: int(value)})
        else:
            cfg[inner] = int(value)
    return cfg


def parse_decode_config(spec: str, device: str = "cuda") -> dict:
    """'default' | 'off' | 'key=value,...' -> a full decode table (the GPU file's, changed)."""
    defaults = _decode_defaults(device)
    if spec == "off":
        return dict(defaults, max_tokens=0)
    return defaults if spec == "default" else _override(defaults, spec, device)


def _decode_batch(T: int, n_adapters: int, H: int):
    """The step's meta (adapters round-robin over the tokens, shuffled as a real batch
    arrives) and bf16 activations x [T, H] on the GPU."""
    gen = torch.Generator().manual_seed(0)
    slots = (torch.arange(T) % n_adapters)[torch.randperm(T, generator=gen)].to("cuda")
    return (build_lora_meta(slots, n_adapters),
            torch.randn(T, H, dtype=torch.bfloat16, device="cuda"))


def rotation_sets(proj: str, n_adapters: int, rank: int) -> int:
    """Copies of the adapters to rotate through, so that they do not stay in L2."""
    H, widths = PROJECTIONS[proj]
    alloc = n_adapters * len(widths) * rank * (H + sum(widths)) * 2
    return max(2, min(64, math.ceil(ROTATE_BYTES / alloc)))


def lora_problem(proj: str, T: int, n_adapters: int, rank: int, sets: int):
    """One add_lora call's inputs in bf16 on the GPU: (slice offsets, meta, x, y [T, N],
    `sets` copies of the adapters as (A slices [L, R, H], B slices [L, N_s, R]))."""
    H, widths = PROJECTIONS[proj]
    dt, dev = torch.bfloat16, "cuda"
    meta, x = _decode_batch(T, n_adapters, H)
    y = torch.randn(T, sum(widths), dtype=dt, device=dev)
    weights = [([torch.randn(n_adapters, rank, H, dtype=dt, device=dev) * 0.02 for _ in widths],
                [torch.randn(n_adapters, n, rank, dtype=dt, device=dev) * 0.02 for n in widths])
               for _ in range(sets)]
    return [sum(widths[:i]) for i in range(len(widths))], meta, x, y, weights


def bench_one(proj: str, T: int, n_adapters: int, rank: int, with_ref: bool,
              extras: bool = True) -> dict:
    H, widths = PROJECTIONS[proj]
    N, S, dt, dev = sum(widths), len(widths), torch.bfloat16, "cuda"
    active = min(n_adapters, T)
    w_bytes = active * S * rank * H * 2 + active * N * rank * 2          # read per call
    sets = rotation_sets(proj, n_adapters, rank)
    offsets, meta, x, y, weights = lora_problem(proj, T, n_adapters, rank, sets)
    tri, ref = get_lora_ops("triton"), get_lora_ops("reference")
    row = {"proj": proj, "tokens": T, "adapters": n_adapters, "rank": rank, "sets": sets}
    row["triton_us"] = _graph_time_us(
        [lambda a=a, b=b: tri.add_lora(y, x, a, b, meta, offsets) for a, b in weights], reps=20)
    a0, b0 = weights[0]
    if extras:
        buf = torch.empty(S, T, rank, dtype=torch.float32, device=dev)
        row["triton_nosplit_us"] = _graph_time_us(
            [lambda a=a, b=b: tri.add_lora(y, x, a, b, meta, offsets, buffer=buf)
             for a, b in weights], reps=20)
        row["triton_eager_us"] = _eager_time_us(
            lambda: tri.add_lora(y, x, a0, b0, meta, offsets), 20)
    # One adapter as plain dense products: x @ A_cat.T, then y += inter @ B_cat.T.
    dense = []
    for _ in range(max(2, min(256, math.ceil(ROTATE_BYTES / (S * rank * (H + N) * 2))))):
        a_cat = torch.randn(S * rank, H, dtype=dt, device=dev) * 0.02
        b_cat = torch.zeros(N, S * rank, dtype=dt, device=dev)
        for s, (off, n) in enumerate(zip(offsets, widths)):
            b_cat[off:off + n, s * rank:(s + 1) * rank] = torch.randn(n, rank, device=dev) * .02
        dense.append((a_cat, b_cat))
    row["dense_one_adapter_us"] = _graph_time_us(
        [lambda a=a, b=b: y.addmm_(torch.mm(x, a.t()), b.t()) for a, b in dense], reps=20)
    if with_ref:
        row["torch_ref_us"] = _eager_time_us(
            lambda: ref.add_lora(y, x, a0, b0, meta, offsets), reps=5)
        row["speedup_vs_torch_ref"] = row["torch_ref_us"] / row["triton_us"]
    row["vs_dense_roofline"] = row["triton_us"] / row["dense_one_adapter_us"]
    moved = T * H * 2 + w_bytes + 2 * T * N * 2
    row["triton_GBps"] = moved / row["triton_us"] / 1e3
    row["fraction_of_copy_bw"] = row["triton_GBps"] / COPY_PEAK_GBS
    return row


def profile_goal_rows(projections, n_adapters: int = 32, T: int = 64, rank: int = 16) -> None:
    """One add_lora call per projection between cudaProfilerStart/Stop, after warm-up calls:
    run under `ncu --profile-from-start off` for the hardware counters of those launches."""
    for proj in projections:
        offsets, meta, x, y, [(a, b)] = lora_problem(proj, T, n_adapters, rank, 1)
        tri = get_lora_ops("triton")
        for _ in range(3):
            tri.add_lora(y, x, a, b, meta, offsets)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        tri.add_lora(y, x, a, b, meta, offsets)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def layer_times(proj: str, T: int = 64, n_adapters: int = 32, rank: int = 16,
                fold_specs=("default",)) -> dict:
    """LoRA's cost inside a layer: the base matmul alone, then with add_lora after it, beside
    it on a side stream, and folded (A rows under W, add_lora_folded) per FOLD_CONFIG spec;
    plus the shrink as a GEMM and the two-launch halves alone."""
    H, widths = PROJECTIONS[proj]
    N, dt, dev = sum(widths), torch.bfloat16, "cuda"
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    sets = max(2, min(16, math.ceil(ROTATE_BYTES / (N * H * 2))))
    meta, x = _decode_batch(T, n_adapters, H)
    layers = [(torch.randn(N, H, dtype=dt, device=dev) * 0.02,
               [torch.randn(n_adapters, rank, H, dtype=dt, device=dev) * 0.02 for _ in widths],
               [torch.randn(n_adapters, n, rank, dtype=dt, device=dev) * 0.02 for n in widths])
              for _ in range(sets)]
    tri = get_lora_ops("triton")
    side = torch.cuda.Stream()

    def serial(w, a, b):
        y = torch.nn.functional.linear(x, w)
        tri.add_lora(y, x, a, b, meta, offsets)

    def overlapped(w, a, b):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            delta = torch.zeros(T, N, dtype=dt, device=dev)
            tri.add_lora(delta, x, a, b, meta, offsets)
        y = torch.nn.functional.linear(x, w)
        main.wait_stream(side)
        y.add_(delta)

    row = {"layer": proj, "tokens": T, "adapters": n_adapters, "rank": rank}
    row["base_us"] = _graph_time_us(
        [lambda w=w: torch.nn.functional.linear(x, w) for w, _, _ in layers], reps=20)
    row["base_then_lora_us"] = _graph_time_us(
        [lambda lw=lw: serial(*lw) for lw in layers], reps=20)
    row["base_beside_lora_us"] = _graph_time_us(
        [lambda lw=lw: overlapped(*lw) for lw in layers], reps=20)
    row["lora_cost_serial_us"] = row["base_then_lora_us"] - row["base_us"]
    row["lora_cost_overlapped_us"] = row["base_beside_lora_us"] - row["base_us"]
    # the shrink folded into the base matmul: every slot's A rows below W in one weight
    ext = [torch.cat([w] + [t.reshape(-1, H) for t in a]) for w, a, _ in layers]
    row["base_with_all_a_rows_us"] = _graph_time_us(
        [lambda w=w: torch.nn.functional.linear(x, w) for w in ext], reps=20)

    def folded(w, b):
        out = torch.nn.functional.linear(x, w)
        tri.add_lora_folded(out[:, :N], out[:, N:], b, meta, offsets, H)

    from lorry.kernels import lora_decode
    saved, fold = lora_decode.FOLD_CONFIG, lora_decode.fold_config(torch.device("cuda"))
    for spec in fold_specs:   # the fold table: "default", "none" (the decode table's), "k=v,..."
        lora_decode.FOLD_CONFIG = fold if spec == "default" else {} if spec == "none" else \
            _override(fold, spec)
        tag = "" if spec == "default" else f"[{spec}]"
        row[f"base_folded_lora_us{tag}"] = t = _graph_time_us(
            [lambda w=w, b=lw[2]: folded(w, b) for w, lw in zip(ext, layers)], reps=20)
        row[f"lora_cost_folded_us{tag}"] = t - row["base_us"]
    lora_decode.FOLD_CONFIG = saved
    row["shrink_as_gemm_us"] = _graph_time_us(
        [lambda w=w, n=N: torch.nn.functional.linear(x, w[n:]) for w in ext], reps=20)
    # the two-launch kernels' halves alone (the split the full call would choose)
    from lorry.kernels import triton_lora
    split = triton_lora.choose_split_k(T, n_adapters, len(widths), H, x.device)
    work = torch.empty(split, len(widths), T, rank, dtype=torch.float32, device=dev)
    y = torch.randn(T, N, dtype=dt, device=dev)
    row["two_launch_shrink_us"] = _graph_time_us(
        [lambda a=a: triton_lora._shrink(x, a, meta, work, split) for _, a, _ in layers], reps=20)
    row["two_launch_expand_us"] = _graph_time_us(
        [lambda b=b: triton_lora._expand(work, b, meta, y, offsets) for _, _, b in layers],
        reps=20)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--projections", nargs="+", default=list(PROJECTIONS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 256, 1024, 8192])
    p.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 32, 128])
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    p.add_argument("--ref-max-tokens", type=int, default=8192)
    p.add_argument("--max-seconds", type=float, default=1e9, help="stop the sweep after this")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--quick", action="store_true",
                   help="time triton and dense only (no torch_ref, no-split or eager columns)")
    p.add_argument("--decode-config", nargs="+", default=["default"])
    p.add_argument("--tune", nargs="+", default=[], metavar="SPEC",
                   help="first time the goal rows (64 tokens, 32 adapters, rank 16, every "
                        "projection) for each decode config, then run the ladder with the one "
                        "of the smallest geometric-mean time")
    p.add_argument("--layer", action="store_true", help="also run layer_times per projection")
    p.add_argument("--profile", action="store_true",
                   help="only one goal-row add_lora call per projection inside "
                        "cudaProfilerStart/Stop (for ncu --profile-from-start off), per "
                        "--decode-config")
    p.add_argument("--fold-configs", nargs="+", default=["default"], metavar="SPEC",
                   help="layer_times: kernels.lora_decode.FOLD_CONFIG settings to time")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "benchmarks/lora_kernels.py needs a CUDA GPU"}))
        sys.exit(1)

    def emit(obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if args.out:   # line by line, so a sweep cut short still leaves its rows
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if args.profile:
        from lorry.kernels import lora_decode
        for spec in args.decode_config:
            lora_decode.DECODE_CONFIG = parse_decode_config(spec)
            profile_goal_rows(args.projections)
        return
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "triton": __import__("triton").__version__, "copy_GBps": copy_bandwidth_gbs()})
    from lorry.kernels import lora_decode

    if args.layer:
        for proj in args.projections:
            emit({k: round(v, 3) if isinstance(v, float) else v
                  for k, v in layer_times(proj, fold_specs=args.fold_configs).items()})
    t0, rows = time.time(), []
    if args.tune:
        scores = {}
        for spec in args.tune:
            lora_decode.DECODE_CONFIG = parse_decode_config(spec)
            logs = []
            for proj in args.projections:
                row = bench_one(proj, 64, 32, 16, False, extras=False)
                row.update(config=spec, tune=True)
                emit({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
                logs.append(math.log(row["triton_us"]))
            scores[spec] = math.exp(sum(logs) / len(logs))
        best = min(scores, key=scores.get)
        emit({"tune_geomean_us": {k: round(v, 3) for k, v in scores.items()}, "best": best})
        args.decode_config = [best]
    for spec in args.decode_config:
        lora_decode.DECODE_CONFIG = parse_decode_config(spec)
        for rank in args.ranks:
            for proj in args.projections:
                for n in args.adapters:
                    for T in args.tokens:
                        if time.time() - t0 > args.max_seconds:
                            break
                        row = bench_one(proj, T, n, rank,
                                        T <= args.ref_max_tokens and not args.quick,
                                        extras=not args.quick)
                        row["decode_path"] = lora_decode.decode_plan(
                            T, n, PROJECTIONS[proj][0], rank, PROJECTIONS[proj][1],
                            torch.device("cuda")) is not None
                        row["config"] = spec
                        rows.append(row)
                        emit({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()})
    goal = [r for r in rows if (r["tokens"], r["adapters"], r["rank"]) == (64, 32, 16)]
    dense = {r["proj"]: r["dense_one_adapter_us"] for r in goal}
    emit({"summary": "decode 64 tokens, 32 adapters, rank 16 (goal: vs_dense <= 1.5, "
                     "speedup_vs_torch_ref >= 5)",
          "rows": [{k: r.get(k) for k in ("config", "proj", "triton_us", "dense_one_adapter_us",
                                          "vs_dense_roofline", "speedup_vs_torch_ref")}
                   for r in goal],
          # the dense time wobbles from row to row: also against the best dense of the run
          "vs_best_dense": {f'{r["config"]}/{r["proj"]}': round(
              r["triton_us"] / min(x["dense_one_adapter_us"] for x in goal
                                   if x["proj"] == r["proj"]), 3) for r in goal}
          if dense else {}})


if __name__ == "__main__":
    main()
