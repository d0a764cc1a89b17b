"""Decode-step GPU time, Triton path vs torch path, on issue 7's workload (prints JSON).

Llama-3-8B shapes with dummy bf16 weights, 32 adapters r16 on q/k/v/o, 64 rows of 128-token
prompts. Times the captured 64-row decode graph (median of event-timed replays), base only
and mixed adapters, with the model's Triton kernels (kernels.fused_ops,
kernels.decode_attention) and with the torch code they replace, on one engine; then the
attention and elementwise kernels alone against their torch counterparts.
Variants: the folded LoRA shrink (EngineConfig.lora_fold) on/off, the torch elementwise path;
--kv-cache-dtype fp8 / --quantization fp8 build the engine that way (the kernel timings then
use fp8 caches and time the fp8 linears: torch._scaled_mm alone and with the input's
quantization); --batch sets the row count.
Usage: python3 benchmarks/decode_step.py [--out decode_step.json] [--generate 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def _replays(graphs, reps: int) -> dict:
    from throughput import graph_replay_times

    out = {}
    for (size, key), (graph, _) in graphs.graphs.items():
        times = graph_replay_times(graph, reps)
        out[f"rows{size}_{'lora' if key else 'base'}"] = {
            "median_ms": round(times[reps // 2], 3), "min_ms": round(times[0], 3)}
    return out


# name -> (model's Triton elementwise/attention kernels, folded LoRA shrink in the decode graph)
STEP_VARIANTS = {"triton": (True, True), "triton_no_fold": (True, False), "torch": (False, True)}


def step_times(eng, adapters, prompts, reps: int, variants=tuple(STEP_VARIANTS)) -> dict:
    """Capture the 64-row step base only and mixed under each variant; replay-time them."""
    from throughput import _params

    from lorry.engine import LoRARequest

    n = len(prompts)
    reqs = [LoRARequest(f"a{i}", i + 1, str(adapters[i % len(adapters)])) for i in range(32)]
    graphs = eng.runner.graphs
    fold_rows = graphs.fold_max_rows
    res = {}
    for name in variants:
        triton_path, fold = STEP_VARIANTS[name]
        eng.runner.model.use_triton_ops = triton_path
        graphs.fold_max_rows = fold_rows if fold else 0
        graphs.graphs.clear()
        graphs.pool = None  # the freed graphs' pool cannot be captured into again
        eng.generate(prompts, _params(8), None, use_tqdm=False)
        eng.generate(prompts, _params(8), [reqs[i % 32] for i in range(n)], use_tqdm=False)
        res[name] = _replays(graphs, reps)
    eng.runner.model.use_triton_ops = True
    graphs.fold_max_rows = fold_rows
    graphs.graphs.clear()
    graphs.pool = None
    return res


def profile_mixed_step(eng, adapters, prompts, path: str, replays: int = 5) -> None:
    """Kernel-time table (torch.profiler) of ``replays`` replays of the mixed 64-row step."""
    import torch
    from throughput import _params
    from torch.profiler import ProfilerActivity, profile

    from lorry.engine import LoRARequest

    reqs = [LoRARequest(f"a{i}", i + 1, str(adapters[i % len(adapters)])) for i in range(32)]
    # long enough that all rows decode together (chunked prefill admits them in waves)
    eng.generate(prompts, _params(48), [reqs[i % 32] for i in range(len(prompts))],
                 use_tqdm=False)
    graph = next(g for (size, key), (g, _) in eng.runner.graphs.graphs.items()
                 if size == len(prompts) and key)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    Path(path).write_text(f"{replays} replays of the mixed {len(prompts)}-row decode step\n{table}")


def generate_runs(eng, adapters, p: dict, times: int) -> list:
    """Issue 7's mixed workload (128 requests, 32 adapters) ``times`` over on one engine:
    from the second run on, every graph bucket is captured before the timed region."""
    from throughput import prompts_for, run_lorry

    prompts = prompts_for(p["requests"], p["prompt_len"], 30000, seed=0)
    runs = [run_lorry(eng, adapters, len(adapters), prompts, p, "cuda") for _ in range(times)]
    return runs + [run_lorry(eng, adapters, 0, prompts, p, "cuda")]


BLOCK_SIZE = 16  # keys per KV cache block in the kernel timings


def paged_cache(rows: int, max_len: int, kv_heads: int, head_dim: int, dtype, device, g,
                cache_dtype=None):
    """Noise-filled k/v caches [num_slots, kvh, D] (in ``cache_dtype``, default ``dtype``)
    behind the null block 0, and block tables [rows, max_len / BLOCK_SIZE] giving each row its
    own consecutive blocks."""
    import torch

    blocks = -(-max_len // BLOCK_SIZE)
    shape = ((1 + rows * blocks) * BLOCK_SIZE, kv_heads, head_dim)
    k = torch.randn(shape, device=device, dtype=dtype, generator=g).to(cache_dtype or dtype)
    v = torch.randn(shape, device=device, dtype=dtype, generator=g).to(cache_dtype or dtype)
    tables = torch.arange(1, 1 + rows * blocks, device=device, dtype=torch.int32)
    return k, v, tables.view(rows, blocks)


def slots_of(tables, positions):
    """Cache slots of ``positions`` [...] of each row of ``tables`` [rows, blocks]."""
    blk = tables.gather(1, (positions // BLOCK_SIZE).view(tables.shape[0], -1).long())
    return (blk.long() * BLOCK_SIZE + positions.view(blk.shape) % BLOCK_SIZE).view(positions.shape)


def attention_times(model, batch: int, avg_len: int, bench) -> dict:
    """Decode attention and rotary + cache write, Triton vs the model's torch code, over
    paged caches of 4 layers (more than L2) with layer 0's shapes; then a few long rows."""
    import torch

    from lorry.engine.model.layers import apply_rotary
    from lorry.kernels.decode_attention import decode_attention
    from lorry.kernels.fused_ops import rotary_qk_

    attn, rot = model.layers[0].self_attn, model.rotary
    h, kvh, D = attn.heads, attn.kv_heads, attn.head_dim
    dev, dt = rot.cos.device, model.embed_tokens.weight.dtype
    kv_dt = getattr(model, "kv_dtype", None) or dt              # fp8 with kv_cache_dtype="fp8"
    L = rot.cos.shape[0]                                        # the engine's max_len
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(batch, (h + 2 * kvh) * D, device=dev, dtype=dt, generator=g)
    pos = torch.randint(avg_len // 2, min(L, avg_len * 3 // 2), (batch,), device=dev, generator=g)
    caches = [paged_cache(batch, L, kvh, D, dt, dev, g, kv_dt) for _ in range(4)]
    tables = caches[0][2]
    n = tables.shape[1] * BLOCK_SIZE                            # kv_len = max_len
    key_slots = slots_of(tables, torch.arange(n, device=dev).expand(batch, n))  # [B, n]
    mask = (torch.arange(n, device=dev)[None, :] <= pos[:, None])[:, None]      # [B, 1, n]
    q4 = qkv[:, :h * D].view(batch, h, 1, D)
    bench("attention_triton_us", lambda: [decode_attention(
        qkv[:, :h * D], k, v, t, pos, BLOCK_SIZE) for k, v, t in caches], 4)
    bench("attention_torch_us", lambda: [attn._grouped(
        q4, k[key_slots].to(dt).transpose(1, 2), v[key_slots].to(dt).transpose(1, 2), mask)
        for k, v, _ in caches], 4)
    k0, v0, _ = caches[0]
    slot_mapping = slots_of(tables, pos)
    bench("rotary_cache_triton_us", lambda: rotary_qk_(qkv, pos, rot.cos, rot.sin, h, kvh, D,
                                                       k0, v0, slot_mapping))

    def torch_rotary():
        qk, v = qkv.split([(h + kvh) * D, kvh * D], dim=-1)
        qk = apply_rotary(qk.view(batch, 1, h + kvh, D).transpose(1, 2),
                          *rot.tables(pos[:, None], dt))
        k0[slot_mapping] = qk[:, h:, 0].to(kv_dt)
        v0[slot_mapping] = v.view(batch, kvh, D).to(kv_dt)
    bench("rotary_cache_torch_us", torch_rotary)
    # a long table with few rows: the sequence-split path
    big_k, big_v, big_tables = paged_cache(8, 4096, kvh, D, dt, dev, g, kv_dt)
    long_pos = torch.full((8,), 4000, device=dev)
    for name, splits in (("", None), ("_one_split", 1)):
        bench(f"attention_triton_8rows_4k{name}_us", lambda splits=splits: decode_attention(
            qkv[:8, :h * D], big_k, big_v, big_tables, long_pos, BLOCK_SIZE, splits))
    return {"attention_kv_bytes_per_step_layer":
            int((pos + 1).sum()) * kvh * D * 2 * kv_dt.itemsize}


def gemm_times(model, batch: int, bench) -> dict:
    """The base GEMMs at M = batch (cuBLAS picks by shape), over 8 layers' weights so that
    L2 (50 MB) does not serve them: achieved TB/s of the weight read. An fp8 base
    (quantization="fp8") times its op whole (the input's quantization and torch._scaled_mm)
    and torch._scaled_mm alone, against bf16 copies of the same weights."""
    import torch

    dev, dt = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    g = torch.Generator(device=dev).manual_seed(0)
    H, inter = model.config.hidden_size, model.config.intermediate_size
    xs = {k: torch.randn(batch, k, device=dev, dtype=dt, generator=g) for k in (H, inter)}
    layers = model.layers[:8]
    mods = {"qkv": [m.self_attn.qkv_proj for m in layers],
            "o": [m.self_attn.o_proj for m in layers],
            "gate_up": [m.mlp.gate_up_proj for m in layers],
            "down": [m.mlp.down_proj for m in layers]}
    out = {}
    for name, ms in mods.items():
        ops = [m.base_op for m in ms]
        if any(op is not None for op in ops):          # fp8: the op, its GEMM alone, bf16 copies
            xw = xs[ops[0].qweight.shape[1]]
            xq, s = ops[0].quantize_input(xw)
            nbytes = ops[0].qweight.numel()
            us = bench(f"gemm_{name}_fp8_op_us", lambda xw=xw, ops=ops: [op(xw) for op in ops],
                       len(ops))
            out[f"gemm_{name}_fp8_op_tb_per_s"] = round(nbytes / us / 1e6, 2)
            us = bench(f"gemm_{name}_fp8_scaled_mm_us", lambda xq=xq, s=s, ops=ops: [
                torch._scaled_mm(xq, op.qweight.t(), s, op.scale, out_dtype=torch.bfloat16)
                for op in ops], len(ops))
            out[f"gemm_{name}_fp8_scaled_mm_tb_per_s"] = round(nbytes / us / 1e6, 2)
            bench(f"gemm_{name}_fp8_quantize_input_us", lambda xw=xw, op=ops[0]:
                  op.quantize_input(xw))
            ws = [(op.qweight.float() * op.scale.t()).to(dt) for op in ops]
            hows = (("linear", lambda xw=xw, ws=ws: [torch.nn.functional.linear(xw, w)
                                                     for w in ws]),)
        else:
            ws = [m.weight for m in ms]
            xw = xs[ws[0].shape[1]]
            hows = (("linear", lambda xw=xw, ws=ws: [torch.nn.functional.linear(xw, w)
                                                     for w in ws]),
                    ("mm_swapped", lambda xw=xw, ws=ws: [torch.mm(w, xw.t()) for w in ws]),
                    ("mm_swapped_contiguous",
                     lambda xw=xw, ws=ws: [torch.mm(w, xw.t()).t().contiguous() for w in ws]))
        for how, fn in hows:
            us = bench(f"gemm_{name}_{how}_us", fn, len(ws))
            out[f"gemm_{name}_{how}_tb_per_s"] = round(ws[0].numel() * 2 / us / 1e6, 2)
    return out


def kernel_times(model, batch: int, avg_len: int) -> dict:
    """The Triton kernels alone vs the torch code of the model, on layer 0's shapes."""
    import torch
    from triton.testing import do_bench_cudagraph

    from lorry.kernels.fused_ops import add_rmsnorm, silu_mul

    out = {}

    def bench(name, fn, per: int = 1) -> float:
        # GPU time per call from replays of a graph of ``fn`` (no launch overhead), in us
        ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
        out[name] = round(ms * 1e3 / per, 1)
        return out[name]

    extra = attention_times(model, batch, avg_len, bench)
    dev, dt = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    g = torch.Generator(device=dev).manual_seed(1)
    H, inter = model.config.hidden_size, model.config.intermediate_size
    x = torch.randn(batch, H, device=dev, dtype=dt, generator=g)
    r = torch.randn(batch, H, device=dev, dtype=dt, generator=g)
    norm = model.layers[0].input_layernorm
    bench("add_rmsnorm_triton_us", lambda: add_rmsnorm(x, r.clone(), norm.weight, norm.eps))
    bench("add_rmsnorm_torch_us", lambda: norm(x + r))
    gu = torch.randn(batch, 2 * inter, device=dev, dtype=dt, generator=g)
    bench("silu_mul_triton_us", lambda: silu_mul(gu))
    bench("silu_mul_torch_us", lambda: torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:])
    out.update(extra)
    out.update(gemm_times(model, batch, bench))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--variants", nargs="+", default=list(STEP_VARIANTS),
                    choices=list(STEP_VARIANTS))
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel timings")
    ap.add_argument("--profile", default=None,
                    help="write the kernel table of replays of the mixed 64-row step here")
    ap.add_argument("--generate", type=int, default=0,
                    help="also run the mixed workload this many times on the engine (tok/s)")
    ap.add_argument("--batch", type=int, default=None, help="rows of the step (default 64)")
    ap.add_argument("--kv-cache-dtype", default=None, help="EngineConfig.kv_cache_dtype, e.g. fp8")
    ap.add_argument("--quantization", default=None, help="EngineConfig.quantization, e.g. fp8")
    ap.add_argument("--bf16-dots", action="store_true",
                    help="an fp8 cache widened to bf16 (kernels.paged_tiles.FP8_DOTS_IN_FP16 off)")
    args = ap.parse_args()
    import throughput
    import torch
    from throughput import LLAMA3_8B, PRESETS, _engine, _targets, prompts_for

    from lorry.kernels import paged_tiles
    from lorry.testing import make_tiny_tokenizer, write_random_adapter

    paged_tiles.FP8_DOTS_IN_FP16 = not args.bf16_dots
    p = dict(PRESETS["llama3-8b"], batch=args.batch or PRESETS["llama3-8b"]["batch"])
    for key in ("kv_cache_dtype", "quantization"):
        if getattr(args, key):
            throughput.ENGINE_OPTIONS[key] = getattr(args, key)
    tmp = Path(tempfile.mkdtemp(prefix="lorry-decode-"))
    model = tmp / "llama3-8b-dummy"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    make_tiny_tokenizer(model)
    adapters = [write_random_adapter(tmp / f"a{i}", LLAMA3_8B, r=p["rank"], seed=i,
                                     target_modules=_targets(p["targets"]))
                for i in range(p["adapters"])]
    prompts = prompts_for(p["batch"], p["prompt_len"], LLAMA3_8B["vocab_size"], seed=0)
    eng = _engine(str(model), p, "cuda", "dummy", len(adapters))
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "batch": p["batch"], "engine": dict(throughput.ENGINE_OPTIONS),
           "fp8_dots_in_fp16": paged_tiles.FP8_DOTS_IN_FP16,
           "step_ms": step_times(eng, adapters, prompts, args.reps, args.variants)}
    if args.profile:
        profile_mixed_step(eng, adapters, prompts, args.profile)
    if args.generate:
        res["generate"] = generate_runs(eng, adapters, p, args.generate)
        print(json.dumps(res["generate"]))
    if not args.no_kernels:
        res["kernels"] = kernel_times(eng.runner.model, p["batch"], 192)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
