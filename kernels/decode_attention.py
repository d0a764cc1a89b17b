"""Flash-decode attention over a paged KV cache (Triton): one query token per sequence.

Each program takes one (sequence, KV head, sequence split): the query heads of that KV head
(grouped-query attention) are one tile, so every key and value is read once. Key position p
of a sequence lives at cache slot ``block_table[p // block_size] * block_size +
p % block_size``; each tile of keys gathers its physical block ids from the sequence's row of
the block table, so a tile may span several blocks and a block several tiles. The loop over
keys stops at the sequence's own position (read from device memory), so short rows read
little and nothing depends on a host length: graph-capturable. A sliding window starts the
loop at the oldest key still in the window; soft-capped logits (Gemma 2) pass through
cap * tanh(s / cap). Long tables are split over the sequence and the splits merged by a
second, small kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorry.kernels.device_info import max_shared_mem, num_sms
from lorry.kernels.launch_math import cdiv, next_pow2
from lorry.kernels.paged_tiles import (
    check_paged,
    kv_tile,
    logits,
    query_compute,
    query_for_cache,
    softmax_update,
)

BLOCK_N = 0           # keys per tile; 0: by head dim and shared memory (launch_for)
MIN_CHUNK = 256       # fewest keys per split
NUM_WARPS = 4
NUM_STAGES = 0        # software pipeline depth; 0: with BLOCK_N (launch_for)
NARROW = (64, 2)      # (keys per tile, stages): every head dim, the interpreter
WIDE = (128, 3)       # head dims <= 128 where the stages fit, tables of WIDE_MIN_KEYS or more
WIDE_MIN_KEYS = 2048  # H100: 5,120-key tables +1.3% (bulk run), 264-key tables -1.5% (128->128)
                      # (graph decode's tables span max_model_len: the rule is per deployment)
SPLIT_KEYS = 2560     # > 0: split tables so that a split spans at most this many keys (0: off)
KEY_SPLITS_MAX = 2    # ... but SPLIT_KEYS adds at most this many splits (measured: 2, 5,120 keys)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                         scale: float | None = None, window: int | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """q: [B, h, D]; caches [num_slots, kvh, D]; block_tables: [B, max_blocks]; positions:
    [B] -> out [B, h, D]. A loop over the rows: each gathers the slots of its visible keys
    (0..position, the last ``window`` of them if given) through its block table and takes an
    fp32 softmax, as engine.model.attention's torch decode path; no other slot is read."""
    B, h, D = q.shape
    kvh = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        pos = int(positions[b])
        p = torch.arange(max(0, pos - window + 1) if window else 0, pos + 1, device=q.device)
        slots = block_tables[b, p // block_size].long() * block_size + p % block_size
        keys = k_cache[slots].to(q.dtype).transpose(0, 1)                 # [kvh, n, D]
        values = v_cache[slots].to(q.dtype).transpose(0, 1)
        qg = q[b].reshape(kvh, h // kvh, D)
        scores = (qg @ keys.transpose(-1, -2)).float() * (scale or D ** -0.5)   # [kvh, g, n]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out[b] = (scores.softmax(-1).to(values.dtype) @ values).reshape(h, D)
    return out


# Arguments that change from step to step are plain runtime values, never constexprs, and
# those not always a multiple of 16 are kept from Triton's specialization on ==1 and %16: each
# new value or class of one compiles the kernel again (~1 s on an H100), which a mixed step's
# decode rows, whose table width is the step's longest row, met dozens of times a bulk run.
# q's row stride too: a step of one decoding row may hand q as a view of any stride, and a
# base off the fused path hands another than the fused one (its q read once a program).
UNSPECIALIZED = ("stride_btb", "stride_qb")


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _decode_attn_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr,
                        stride_qb, stride_btb, stride_btn, s_cs, s_ch, stride_ob, scale,
                        q_shift, window, chunk, SOFTCAP: tl.constexpr, G: tl.constexpr,
                        G_PAD: tl.constexpr,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr,
                        IEEE: tl.constexpr, F16: tl.constexpr):
    # one body: the online softmax keeps paging, window, soft-cap and split output in one loop
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(pos_ptr + b).to(tl.int32) + 1                      # keys 0..pos
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n)
    if window > 0:                                                 # keys n-window..n-1 only
        lo = tl.maximum(lo, n - window)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    head = kvh * G + g                                             # query heads of this kv head
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * D + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)         # [G_PAD, BLOCK_D]
    q, scale = query_for_cache(q, scale, q_shift, F16)
    kbase = kc_ptr + kvh.to(tl.int64) * s_ch
    vbase = vc_ptr + kvh.to(tl.int64) * s_ch
    table = bt_ptr + b * stride_btb                                # this sequence's block ids
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        k, v, km = kv_tile(table, kbase, vbase, offs, hi, d, dm, stride_btn, s_cs, BLOCK_SIZE)
        k, v = k.to(q.dtype), v.to(q.dtype)         # an fp8 cache's, widened (fp16: F16)
        s = logits(q, k, scale, SOFTCAP, IEEE)
        s = tl.where(km[None, :], s, float("-inf"))               # [G_PAD, BLOCK_N]
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, IEEE)
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + head[:, None] * D + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
    else:
        # unnormalised partial of this split; a split with no keys of the row stores nothing
        # (the merge skips it: a short row of a long table costs one split, not SPLITS)
        hs = (b * G * tl.num_programs(1) + head) * SPLITS + split  # [G_PAD] index of (b, head, split)
        live = gm & (g * 0 + lo < hi)                               # [G_PAD]
        tl.store(part_ptr + hs[:, None] * BLOCK_D + d[None, :], acc, mask=live[:, None])
        tl.store(ml_ptr + hs * 2, m_i, mask=live)
        tl.store(ml_ptr + hs * 2 + 1, l_i, mask=live)


@triton.jit
def _merge_splits_kernel(part_ptr, ml_ptr, pos_ptr, out_ptr, stride_ob, H, window, chunk,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    n = tl.load(pos_ptr + b).to(tl.int32) + 1
    first = tl.where(window > 0, tl.maximum(n - window, 0), 0)    # the oldest visible key
    live = (sp * chunk < n) & ((sp + 1) * chunk > first)          # the splits that had keys
    base = (b * H + head) * SPLITS + sp                            # [SPLITS]
    m = tl.load(ml_ptr + base * 2, mask=live, other=float("-inf"))
    lsum = tl.load(ml_ptr + base * 2 + 1, mask=live, other=0.0)
    w = tl.exp(m - tl.max(m, 0))                # the split of the row's own position has keys
    acc = tl.load(part_ptr + base[:, None] * BLOCK_D + d[None, :], mask=live[:, None],
                  other=0.0)                                       # [SPLITS, BLOCK_D]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + b * stride_ob + head * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Sequence splits (a power of two) so that batch * kv_heads * splits programs fill the
    chip twice over (and, with SPLIT_KEYS, no split spans more keys than that, up to
    KEY_SPLITS_MAX splits: the longest rows of a full batch then end with the rest; a split
    past a row's keys stores nothing), each split keeping at least MIN_CHUNK keys. Host
    constants only."""
    want = cdiv(2 * num_sms(device), max(1, batch * kv_heads))
    if SPLIT_KEYS:
        want = max(want, min(KEY_SPLITS_MAX, cdiv(max_len, SPLIT_KEYS)))
    cap = max(1, max_len // MIN_CHUNK)
    return next_pow2(max(1, min(want, cap))) if min(want, cap) > 1 else 1


def launch_for(block_d: int, dtype: torch.dtype, device: torch.device,
               max_len: int) -> tuple[int, int]:
    """(keys per tile, pipeline stages) of the decode launch for a (padded) head dim and a
    table of ``max_len`` keys.

    The wide launch halves the loop's trips over long rows, but a row's last tile is masked
    up to 127 keys past its end (short tables lose: 264 keys take three 128-key tiles, 384
    keys' work), and its stages hold a K and a V tile each in shared memory: at head dim 128
    in bf16 three stages take 192 KiB, which an H100's 227 KiB holds and Gemma-2's head dim
    256 (384 KiB) or an fp32 cache would not. So it is taken only for tables of at least
    WIDE_MIN_KEYS keys whose stages fit the device's opt-in shared memory with room for the
    query tile; everything else, and the CPU interpreter, runs the narrow launch. BLOCK_N
    and NUM_STAGES set (non-zero) override both, for A/B runs.

    ``max_len`` is the table's width, not the rows' lengths: CUDA-graph decode's tables span
    ``max_model_len``, so an engine of max_model_len >= 2,048 takes the wide launch for
    every row, short ones too (the bulk run, max_model_len 5,120 with rows of 50-5,000 keys,
    gained 1.3% so; short rows alone under a long max_model_len are not measured).
    """
    if BLOCK_N and NUM_STAGES:
        return BLOCK_N, NUM_STAGES
    tile_n, stages = WIDE
    need = stages * 2 * tile_n * block_d * dtype.itemsize
    if (block_d <= 128 and max_len >= WIDE_MIN_KEYS
            and need + 16 * 1024 <= max_shared_mem(device)):
        return WIDE
    return NARROW


def launch_key(batch: int, kv_heads: int, max_len: int, head_dim: int, cache_dtype: torch.dtype,
               device: torch.device, splits: int | None = None) -> tuple[int, int, int]:
    """(splits, keys per tile, stages) of a decode launch over ``batch`` rows and a table of
    ``max_len`` keys: with the model's head shape, all that a launch compiles by (the split
    length, the table's width and strides are plain arguments). A mixed step's decode rows
    run eagerly with tables as wide as their longest row, so engine.warmup runs one step of
    each key at start-up."""
    splits = splits or num_splits(batch, kv_heads, max_len, device)
    return (splits, *launch_for(next_pow2(head_dim), cache_dtype, device, max_len))


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                  splits: int | None) -> None:
    """Raise ValueError naming the first input decode_attention cannot take."""
    check_paged("decode_attention", q, k_cache, v_cache, block_size)
    B = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != B or positions.shape != (B,):
        raise ValueError(f"block_tables must be [{B}, max_blocks] and positions [{B}] for {B} "
                         f"queries, got {tuple(block_tables.shape)} and {tuple(positions.shape)}")
    if splits is not None and (splits < 1 or splits & (splits - 1)):
        raise ValueError(f"splits must be a power of two, got {splits}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                     splits: int | None = None, *, scale: float | None = None,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its keys in a paged KV cache.

    Parameters
    ----------
    q : [B, h*D]; rows may be strided (e.g. the q part of a fused qkv), unit last stride.
    k_cache, v_cache : [num_slots, kvh, D] with num_slots = num_blocks * block_size.
    block_tables : [B, max_blocks] int; row b's physical block ids in key order. Entries
        past a sequence's last key are never read.
    positions : [B]; keys 0..positions[b] attend (the last ``window`` of them if given).
    block_size : keys per block (a compile-time constant of the kernel).
    splits : sequence splits (a power of two); by default from the batch and
        max_len = max_blocks * block_size, host integers only, so the call is graph-capturable.
    scale : logit scale, D**-0.5 by default.
    window : sliding window in keys, the query's own key included.
    softcap : caps the scaled logits at cap * tanh(s / cap).

    Returns
    -------
    out : [B, h*D] in q's dtype.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, positions, block_size, splits)
    B = q.shape[0]
    _, kvh, D = k_cache.shape
    h = q.shape[1] // D
    out = torch.empty(B, h * D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    G = h // kvh
    max_len = block_tables.shape[1] * block_size
    splits, block_n, stages = launch_key(B, kvh, max_len, D, k_cache.dtype, q.device, splits)
    block_d = next_pow2(D)
    chunk = cdiv(cdiv(max_len, splits), block_n) * block_n
    if splits > 1:
        part = torch.empty(B * h * splits, block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(B * h * splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    scale = scale or D ** -0.5
    f16, q_shift = query_compute(q, k_cache, scale)
    _decode_attn_kernel[(B, kvh, splits)](
        q, k_cache, v_cache, block_tables, positions, out, part, ml,
        q.stride(0), block_tables.stride(0), block_tables.stride(1), k_cache.stride(0),
        k_cache.stride(1), out.stride(0), scale, q_shift, window or 0, chunk,
        SOFTCAP=float(softcap or 0.0), G=G, G_PAD=max(16, next_pow2(G)), D=D,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=block_size, SPLITS=splits,
        IEEE=q.dtype == torch.float32, F16=f16, num_warps=NUM_WARPS, num_stages=stages)
    if splits > 1:
        _merge_splits_kernel[(B, h)](part, ml, positions, out, out.stride(0), h, window or 0,
                                     chunk, D=D, BLOCK_D=block_d, SPLITS=splits,
                                     num_warps=4)
    return out
