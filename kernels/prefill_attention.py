"""Prefill attention over a paged KV cache (Triton): a step's prompt tokens over their keys.

A prefill step (prompts from position 0, a prompt's next chunk after its earlier chunks, or
after a cached prefix) attends each of its query tokens to every key of its sequence up to
the token's own position, read through the sequence's block table: the step has already
written its own tokens' keys/values into the cache, so one loop covers the cached prefix and
the chunk. This replaces gathering every row's keys up to the batch's longest row and a
masked ``scaled_dot_product_attention``, which for grouped-query heads and an explicit mask
runs PyTorch's math backend (the full fp32 score matrix per head).

Row b of the step holds ``q_len[b]`` queries at positions ``ctx[b]``, ``ctx[b] + 1``, ...;
its query i is row ``q_start[b] + i`` of q (the packed real tokens), or ``b * row_stride + i``
(a right-padded [B, S] layout). One program takes BLOCK_M rows of one sequence: a tile of
BLOCK_M / p queries under p query heads that share a kv head (``heads_packed``: grouped-query
heads, so each tile of keys is gathered, and an fp8 cache's widened, once for the p heads);
a tile past a row's queries reads no key and stores nothing. Keys run from 0 (or the oldest one the
tile's window keeps) to the tile's last position, BLOCK_N at a time, each tile of keys
gathering its block ids from the row's block table; a query sees the keys at or before its
position, and within ``window`` of it when windowed; soft-capped logits (Gemma 2) pass
through cap * tanh(s / cap).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorry.kernels.launch_math import cdiv, next_pow2
from lorry.kernels.paged_tiles import (
    check_paged,
    kv_tile,
    logits,
    query_compute,
    query_for_cache,
    softmax_update,
)

# Launch settings: benchmarks/prefill_attn_sweep.py timed 36 on an H100 at a bulk prompt step
# (Llama-3-8B heads, 5,079 queries in 8 rows): these 0.410 ms, the earlier 64 / 64 / 4 / 2
# 0.464 ms, wider tiles (128 queries or keys, 8 warps) 0.49-0.51 ms
BLOCK_M = 64          # queries per program
BLOCK_N = 32          # keys per tile
NUM_WARPS, NUM_STAGES = 4, 3
# grouped-query heads a program takes together (at most; a power of two dividing the group):
# each key tile is read, and an fp8 cache's widened, once for them all, not once per head
MAX_PACK = 4
# Over an fp8 cache: the same sweep (--kv-cache-dtype fp8, the fp16 dots; H100, 2026-12-07,
# 48 settings) timed 64 keys a tile in 2 stages with 2 heads a program at 0.408 ms, the
# 16-bit settings above 0.557 (each tile of keys widened from e4m3 in the loop: longer
# tiles halve its trips); 4 heads 0.423, 1 head 0.420. (BLOCK_M, BLOCK_N, warps, stages,
# MAX_PACK); None: the settings above for every cache.
FP8_LAUNCH: tuple | None = (64, 64, 4, 2, 2)


def launch_settings(cache_dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, MAX_PACK) of a launch over this cache."""
    if cache_dtype.itemsize == 1 and FP8_LAUNCH is not None:
        return FP8_LAUNCH
    return BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, MAX_PACK


def heads_packed(G: int, block_m: int | None = None, max_pack: int | None = None) -> int:
    """The query heads of one kv head a program takes (rows = queries x heads): the largest
    power of two dividing ``G`` and at most ``max_pack`` (MAX_PACK) and BLOCK_M."""
    p = 1
    while p * 2 <= min(max_pack or MAX_PACK, block_m or BLOCK_M) and G % (p * 2) == 0:
        p *= 2
    return p


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, rows: torch.Tensor, block_size: int,
                          row_stride: int = 0, scale: float | None = None,
                          window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [Tq, h, D]; caches [num_slots, kvh, D]; block_tables [B, max_blocks]; rows [3, B]
    (q_start, q_len, ctx) -> out [Tq, h, D] (zero where no query is). A loop over the
    queries: each gathers the slots of its visible keys through its row's block table and
    takes an fp32 softmax."""
    h, D = q.shape[1], q.shape[2]
    kvh = k_cache.shape[1]
    out = torch.zeros_like(q)
    for b, (start, n, ctx) in enumerate(rows.t().tolist()):
        for i in range(n):
            pos, r = ctx + i, (b * row_stride if row_stride else start) + i
            p = torch.arange(max(0, pos - window + 1) if window else 0, pos + 1, device=q.device)
            slots = block_tables[b, p // block_size].long() * block_size + p % block_size
            keys = k_cache[slots].to(q.dtype).transpose(0, 1)
            values = v_cache[slots].to(q.dtype).transpose(0, 1)
            qg = q[r].reshape(kvh, h // kvh, D)
            scores = (qg @ keys.transpose(-1, -2)).float() * (scale or D ** -0.5)
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[r] = (scores.softmax(-1).to(values.dtype) @ values).reshape(h, D)
    return out


# the row count, the table width and a padded layout's row length change from step to step:
# kept from Triton's specialization on ==1 and %16 (each new class compiles the kernel again)
UNSPECIALIZED = ("stride_rows", "row_stride", "stride_btb")


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _prefill_attn_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, rows_ptr, out_ptr, stride_rows,
                         row_stride, stride_qt, stride_btb, stride_btn, s_cs, s_ch, stride_ot,
                         scale, q_shift, window, SOFTCAP: tl.constexpr, G: tl.constexpr,
                         PACK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr, F16: tl.constexpr):
    # a program's BLOCK_M rows: BLOCK_M // PACK queries, each under PACK query heads of one
    # kv head (row r: query r // PACK, head program_id(0) * PACK + r % PACK)
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK
    first = tl.program_id(1) * BLOCK_Q
    b = tl.program_id(2).to(tl.int64)
    n = tl.load(rows_ptr + stride_rows + b)                          # the row's queries
    ctx = tl.load(rows_ptr + 2 * stride_rows + b)                    # its first position
    if row_stride > 0:
        q0 = b * row_stride
    else:
        q0 = tl.load(rows_ptr + b).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    i = first + r // PACK
    head = tl.program_id(0) * PACK + r % PACK                        # [BLOCK_M]
    im = i < n
    pos = ctx + i                                                    # [BLOCK_M]
    hi = ctx + tl.minimum(first + BLOCK_Q, n)                        # keys 0..tile's last pos
    lo = hi * 0
    if window > 0:
        lo = tl.maximum(lo, ctx + first - window + 1)
    hi = tl.where(first < n, hi, lo)                                 # past the row: no key
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + (q0 + i)[:, None] * stride_qt + (head * D)[:, None] + d[None, :],
                mask=im[:, None] & dm[None, :], other=0.0)             # [BLOCK_M, BLOCK_D]
    q, scale = query_for_cache(q, scale, q_shift, F16)
    kvh = tl.program_id(0) * PACK // G
    kbase = kc_ptr + kvh.to(tl.int64) * s_ch
    vbase = vc_ptr + kvh.to(tl.int64) * s_ch
    table = bt_ptr + b * stride_btb
    # finite start: a query whose first key tiles are all outside its window stays at 0
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        k, v, km = kv_tile(table, kbase, vbase, offs, hi, d, dm, stride_btn, s_cs, BLOCK_SIZE)
        k, v = k.to(q.dtype), v.to(q.dtype)         # an fp8 cache's, widened (fp16: F16)
        s = logits(q, k, scale, SOFTCAP, IEEE)
        seen = km[None, :] & (offs[None, :] <= pos[:, None])
        if window > 0:
            seen = seen & (offs[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))                         # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, IEEE)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + (q0 + i)[:, None] * stride_ot + (head * D)[:, None] + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=im[:, None] & dm[None, :])


def _check_inputs(q, k_cache, v_cache, block_tables, rows, block_size) -> None:
    """Raise ValueError naming the first input prefill_attention cannot take."""
    check_paged("prefill_attention", q, k_cache, v_cache, block_size)
    if rows.dim() != 2 or rows.shape[0] != 3 or rows.stride(1) != 1:
        raise ValueError(f"rows must be [3, B] (q_start, q_len, ctx) with unit column stride, "
                         f"got {tuple(rows.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != rows.shape[1]:
        raise ValueError(f"block_tables must be [{rows.shape[1]}, max_blocks], got "
                         f"{tuple(block_tables.shape)}")


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, rows: torch.Tensor, max_q: int,
                      block_size: int, *, row_stride: int = 0, scale: float | None = None,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of a prefill step's queries over their sequences' keys in a paged KV cache.

    Parameters
    ----------
    q : [Tq, h*D]; rows may be strided (the q part of a fused qkv), unit last stride.
    k_cache, v_cache : [num_slots, kvh, D] holding every query's own key already.
    block_tables : [B, max_blocks] int; row b's physical block ids in key order, covering
        its last position. Entries past that are never read.
    rows : [3, B] int32 (q_start, q_len, ctx): row b's queries are q rows q_start[b] ..
        q_start[b] + q_len[b] - 1 (with ``row_stride`` > 0: b * row_stride + i instead, and
        q_start is not read), at positions ctx[b], ctx[b] + 1, ...; query i attends to keys
        0..ctx[b] + i (the last ``window`` of them if given).
    max_q : the largest q_len (a host int: the grid).
    block_size : keys per block (a compile-time constant of the kernel).
    scale : logit scale, D**-0.5 by default.
    window : sliding window in keys, the query's own key included.
    softcap : caps the scaled logits at cap * tanh(s / cap).

    Returns
    -------
    out : [Tq, h*D] in q's dtype, zero in the rows no query takes (padding).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, rows, block_size)
    B = rows.shape[1]
    _, kvh, D = k_cache.shape
    h = q.shape[1] // D
    out = torch.zeros(q.shape[0], h * D, dtype=q.dtype, device=q.device)
    if B == 0 or max_q <= 0:
        return out
    block_m, block_n, warps, stages, max_pack = launch_settings(k_cache.dtype)
    pack = heads_packed(h // kvh, block_m, max_pack)
    scale = scale or D ** -0.5
    f16, q_shift = query_compute(q, k_cache, scale)
    _prefill_attn_kernel[(h // pack, cdiv(max_q, block_m // pack), B)](
        q, k_cache, v_cache, block_tables, rows, out, rows.stride(0), row_stride,
        q.stride(0), block_tables.stride(0), block_tables.stride(1), k_cache.stride(0),
        k_cache.stride(1), out.stride(0), scale, q_shift, window or 0,
        SOFTCAP=float(softcap or 0.0), G=h // kvh, PACK=pack, D=D,
        BLOCK_D=max(16, next_pow2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, IEEE=q.dtype == torch.float32, F16=f16, num_warps=warps,
        num_stages=stages)
    return out
