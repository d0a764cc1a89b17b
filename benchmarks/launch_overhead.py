"""Host time per call of the engine's kernel launchers, at Llama-3-8B's prefill shapes (JSON).

An eager prefill step calls each launcher on every layer; when the host issues a step more
slowly than the GPU runs it, these microseconds are the step's time. On CUDA the launches
are real and only the host's issue time is timed (no sync per call). Elsewhere (any machine)
the Triton kernels are replaced by no-op launches, so what is timed is the launchers' own
Python: grids, block sizes, checks, workspaces.

    PYTHONPATH=. python benchmarks/launch_overhead.py [--tokens N] [--device cpu|cuda] [--forward]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _stub_kernels() -> None:
    """Replace every Triton kernel the launchers call by a launch that does nothing."""
    from lorry.kernels import (
        decode_attention,
        fused_ops,
        lora_decode,
        prefill_attention,
        triton_lora,
    )

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (triton_lora, lora_decode, decode_attention, prefill_attention, fused_ops):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, NoLaunch())


def _us(fn, device: str, repeats: int) -> float:
    """Median host microseconds of ``fn()`` (issue time only on CUDA)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.synchronize()
    return round(1e6 * statistics.median(times), 1)


def forward_host_ms(repeats: int) -> dict:
    """Host milliseconds of one prefill step (6 prompts of 20-45 tokens) of a 32-layer Llama
    with 64-wide layers, no-op kernels (off CUDA only): so small that the step's own compute
    is a small part; the Llama-shaped blocks' Triton prefill against the torch layers'."""
    import tempfile
    from pathlib import Path

    from lorry.engine import EngineConfig, LLMEngine, SamplingParams
    from lorry.engine.model import attention, llama
    from lorry.testing import make_tiny_llama

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama(Path(tmp) / "m", num_layers=32, hidden_size=64, num_heads=4,
                                num_kv_heads=2, max_position_embeddings=512)
        eng = LLMEngine(EngineConfig(model=str(model), device="cpu", enable_lora=False,
                                     max_model_len=512, num_kv_blocks=256))
        runner, real = eng.runner, type(eng.runner).prefill

        def measured(seqs, slots, chunks=None):
            for name, paged in (("triton_prefill", True), ("torch_prefill", False)):
                attention.PAGED_PREFILL = paged
                out[name] = round(_us(lambda: real(runner, seqs, slots, chunks), "cpu",
                                      repeats) / 1e3, 2)
            attention.PAGED_PREFILL = True
            return real(runner, seqs, slots, chunks)

        # the Llama-shaped blocks' path (and flash-decode) as on CUDA
        fused, flash = llama.fused_ops_on, attention.flash_decode
        llama.fused_ops_on = attention.flash_decode = lambda x: True
        runner.prefill = measured
        try:
            for i in range(6):
                eng.add_request(str(i), [5 + (7 * i + j) % 200 for j in range(20 + 5 * i)],
                                SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            eng.step()
        finally:
            llama.fused_ops_on, attention.flash_decode = fused, flash
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens of the prefill step (default: 2048 on CUDA; 64 elsewhere, "
                         "where the outputs' allocation and zeroing are real CPU work)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--forward", action="store_true",
                    help="also the host time of a whole 32-layer prefill step (off CUDA)")
    args = ap.parse_args()
    dev = args.device
    T = args.tokens or (2048 if dev == "cuda" else 64)
    if dev != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"    # CPU tensors pass the launchers' checks
        _stub_kernels()
    from lorry.kernels import decode_attention, fused_ops, prefill_attention, triton_lora
    from lorry.kernels.segments import build_lora_meta

    bf16, H, h, kvh, D, L, R, bs = torch.bfloat16, 4096, 32, 8, 128, 32, 64, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dev, bf16)
    meta = build_lora_meta(torch.randint(0, 28, (T,), generator=g, dtype=torch.int32).to(dev), L)
    a = [torch.zeros(L, R, H, dtype=bf16, device=dev) for _ in range(3)]
    b = [torch.zeros(L, n, R, dtype=bf16, device=dev) for n in (h * D, kvh * D, kvh * D)]
    y = torch.zeros(T, (h + 2 * kvh) * D, dtype=bf16, device=dev)
    blocks = 2 * T // bs + 2
    kc = torch.zeros(blocks * bs, kvh, D, dtype=bf16, device=dev)
    tables = torch.arange(1, blocks, dtype=torch.int32, device=dev)[None, :]
    rows = torch.tensor([[0], [T], [0]], dtype=torch.int32, device=dev)
    pos = torch.arange(T, device=dev)
    slots = pos + bs
    cos = torch.zeros(2 * T, D, device=dev)
    dec = torch.zeros(64, h * D, dtype=bf16, device=dev)
    dtab = tables.expand(64, -1).contiguous()
    dpos = torch.full((64,), T - 1, device=dev)
    residual, norm = x.clone(), torch.ones(H, dtype=bf16, device=dev)
    calls = {
        "add_lora_qkv": lambda: triton_lora.add_lora(y, x, a, b, meta,
                                                     [0, h * D, (h + kvh) * D]),
        "rotary_qk_cache_write": lambda: fused_ops.rotary_qk_(y, pos, cos, cos, h, kvh, D, kc, kc,
                                                              slots),
        "prefill_attention": lambda: prefill_attention.prefill_attention(
            y[:, :h * D], kc, kc, tables, rows, T, bs),
        "decode_attention_64_rows": lambda: decode_attention.decode_attention(
            dec, kc, kc, dtab, dpos, bs),
        "add_rmsnorm": lambda: fused_ops.add_rmsnorm(x, residual, norm, 1e-5),
    }
    res = {"benchmark": "launch_overhead", "device": dev, "tokens": T,
           "launches": "real (host issue time)" if dev == "cuda" else "no-op (launchers' Python)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "us_per_call": {k: _us(fn, dev, args.repeats) for k, fn in calls.items()}}
    if args.forward and dev != "cuda":
        res["prefill_step_host_ms"] = forward_host_ms(max(5, args.repeats // 10))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
