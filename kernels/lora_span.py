"""Span path of the Triton LoRA backend: decode-sized batches over slot-sorted token tiles.

``kernels.triton_lora.add_lora`` calls :func:`try_add_lora_span` first; it returns False
(and does nothing) when the call is not one the path takes (SPAN_CONFIG: token count, rank,
slices), and the other paths run. Two launches (kernels/lora_span_kernel.py): a shrink over
(token tile, slice, k-part) and an expand over (token tile, column tile). Every choice is
made from host constants (T, widths, max_loras, rank), so a captured step always takes the
same path.
"""
from __future__ import annotations

import torch
import triton

from kernels.device_info import interpreted, num_sms
from kernels.lora_span_kernel import span_expand_kernel, span_shrink_kernel
from kernels.segments import LoRAMeta

# benchmarks/kernels.py --span-config overrides entries; docs/BENCHMARKS.md has the figures.
SPAN_CONFIG = {
    "enabled": False,          # off: slower than the other paths on an H200 (BENCHMARKS.md)
    "max_tokens": 256,         # span path for T <= max_tokens ...
    "max_rank": 64,            # ... and slot widths up to this
    "block_m": 16,             # sorted positions per tile
    "block_k": 256,            # shrink: reduction tile over H (halved for rank > 16)
    "block_n": 128,            # expand: column tile (halved for rank > 16)
    "programs_per_sm": 2,      # the shrink splits H until its programs fill the GPU
    "max_split_k": 16,
    "num_warps": 4,
    "shrink_stages": 2,
    "expand_stages": 3,
}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def span_plan(T: int, hidden: int, rank: int, widths: list[int], device: torch.device,
              cfg: dict | None = None) -> dict | None:
    """Block sizes and grid of the span launches, or None if the path does not apply."""
    cfg = SPAN_CONFIG if cfg is None else cfg
    if not cfg["enabled"] or not 0 < T <= cfg["max_tokens"] or not 0 < rank <= cfg["max_rank"] \
            or not 0 < len(widths) <= 3 or min(widths) <= 0:
        return None
    block_r = max(16, triton.next_power_of_2(rank))
    wide = block_r > 16
    block_k = min(cfg["block_k"] // (2 if wide else 1), max(16, triton.next_power_of_2(hidden)))
    block_n = min(cfg["block_n"] // (2 if wide else 1),
                  max(16, triton.next_power_of_2(max(widths))))
    tiles = triton.cdiv(T, cfg["block_m"])
    chunks = triton.cdiv(hidden, block_k)
    target = cfg["programs_per_sm"] * num_sms(device)
    split = max(1, min(cfg["max_split_k"], chunks, target // (tiles * len(widths))))
    k_per_split = triton.cdiv(chunks, split) * block_k
    split = triton.cdiv(hidden, k_per_split)        # no empty k-part
    col_tiles = [triton.cdiv(n, block_n) for n in widths]
    return {"block_m": cfg["block_m"], "block_r": block_r, "block_k": block_k,
            "block_n": block_n, "tiles": tiles, "split_k": split, "k_per_split": k_per_split,
            "col_tiles": col_tiles, "num_warps": cfg["num_warps"],
            "shrink_stages": cfg["shrink_stages"], "expand_stages": cfg["expand_stages"]}


def try_add_lora_span(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
                      lora_b: list[torch.Tensor], meta: LoRAMeta,
                      slice_offsets: list[int]) -> bool:
    """y[:, slices] += LoRA(x) through the span kernels if the path applies; else False."""
    T, H = x.shape
    R = lora_a[0].shape[1]
    widths = [b.shape[1] for b in lora_b]
    plan = span_plan(T, H, R, widths, x.device)
    if plan is None or any(a.stride() != lora_a[0].stride() for a in lora_a):
        return False
    S = len(lora_a)
    pad = 3 - S
    a_ptrs = lora_a + [lora_a[0]] * pad
    b_ptrs = lora_b + [lora_b[0]] * pad
    work = torch.empty(plan["split_k"], S, T, R, dtype=torch.float32, device=x.device)
    common = {"BLOCK_M": plan["block_m"], "BLOCK_R": plan["block_r"],
              "PRECISION": _precision(lora_b[0].dtype), "UPCAST": interpreted(),
              "num_warps": plan["num_warps"]}
    span_shrink_kernel[(plan["tiles"], S, plan["split_k"])](
        x, *a_ptrs, work, meta.sorted_token_ids, meta.sorted_slots,
        T, H, R, meta.max_loras, plan["k_per_split"],
        x.stride(0), x.stride(1), *lora_a[0].stride(),
        work.stride(0), work.stride(1), work.stride(2),
        BLOCK_K=plan["block_k"], num_stages=plan["shrink_stages"], **common)
    tiles = plan["col_tiles"] + [0] * pad
    widths = widths + [0] * pad
    offs = list(slice_offsets) + [0] * pad
    b_strides = [s for t in b_ptrs for s in t.stride()]
    span_expand_kernel[(plan["tiles"], sum(tiles))](
        work, *b_ptrs, y, meta.sorted_token_ids, meta.sorted_slots,
        T, R, meta.max_loras, *widths, *offs, tiles[0], tiles[0] + tiles[1],
        work.stride(0), work.stride(1), work.stride(2), *b_strides, y.stride(0), y.stride(1),
        BLOCK_N=plan["block_n"], SPLIT_K=plan["split_k"], num_stages=plan["expand_stages"],
        **common)
    return True
