"""Prefill attention over a paged KV cache (Triton): chunks of prompt tokens after cached keys.

A chunked prefill step (a prompt's next chunk after its earlier chunks, or after a cached
prefix) attends each of its query tokens to every key of its sequence up to the token's own
position, read through the sequence's block table: the step has already written its own
tokens' keys/values into the cache, so one loop covers the cached prefix and the chunk. This
replaces gathering every row's keys up to the batch's longest row and a masked
``scaled_dot_product_attention``, which for grouped-query heads and an explicit mask runs
PyTorch's math backend (the full fp32 score matrix per head: ~100 ms of an 8B step).

The queries keep the engine's right-padded ``[B, S]`` layout: row b's token i is query
``b * S + i`` at ``positions[b, i]`` (padding repeats a row's last position, so a padding
query attends as one at that position). One program takes one (query head, tile of BLOCK_M
queries of one row); tiles of padding only are skipped and left zero. Keys run from 0 (or
the oldest one the tile's window keeps) to the tile's last position, BLOCK_N at a time, each
tile of keys gathering its block ids from the row's block table; a query sees the keys at or
before its position, and within ``window`` of it when windowed; soft-capped logits (Gemma 2)
pass through cap * tanh(s / cap).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64          # queries per program
BLOCK_N = 64          # keys per tile


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                          scale: float | None = None, window: int | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """q: [B*S, h, D]; caches [num_slots, kvh, D]; block_tables [B, max_blocks]; positions
    [B, S] -> out [B*S, h, D]. A loop over the queries: each gathers the slots of its visible
    keys through its row's block table and takes an fp32 softmax."""
    B, S = positions.shape
    h, D = q.shape[1], q.shape[2]
    kvh = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        for i in range(S):
            pos = int(positions[b, i])
            p = torch.arange(max(0, pos - window + 1) if window else 0, pos + 1, device=q.device)
            slots = block_tables[b, p // block_size].long() * block_size + p % block_size
            keys, values = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)
            qg = q[b * S + i].reshape(kvh, h // kvh, D)
            scores = (qg @ keys.transpose(-1, -2)).float() * (scale or D ** -0.5)
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[b * S + i] = (scores.softmax(-1).to(values.dtype) @ values).reshape(h, D)
    return out


# Long by design: one program's whole online-softmax loop; helpers would re-pass its pointers.
@triton.jit
def _prefill_attn_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, out_ptr, S,
                         stride_qt, stride_btb, stride_btn, stride_pb, stride_ps, s_cs, s_ch,
                         stride_ot, scale, window, SOFTCAP: tl.constexpr, G: tl.constexpr,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr):
    head = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    b = tl.program_id(2).to(tl.int64)
    i = first + tl.arange(0, BLOCK_M)
    im = i < S
    prow = pos_ptr + b * stride_pb
    pos = tl.load(prow + i * stride_ps, mask=im, other=0).to(tl.int32)   # [BLOCK_M]
    last = tl.minimum(first + BLOCK_M, S) - 1
    hi = tl.load(prow + last * stride_ps).to(tl.int32) + 1          # keys 0..tile's last pos
    p0 = tl.load(prow + first * stride_ps).to(tl.int32)              # the tile's first pos
    lo = hi * 0
    if window > 0:
        lo = tl.maximum(lo, p0 - window + 1)
    # a tile of padding only (its first query repeats the one before it) reads no key
    before = tl.load(prow + tl.maximum(first - 1, 0) * stride_ps).to(tl.int32)
    hi = tl.where((first > 0) & (p0 == before), lo, hi)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + (b * S + i)[:, None] * stride_qt + head * D + d[None, :],
                mask=im[:, None] & dm[None, :], other=0.0)             # [BLOCK_M, BLOCK_D]
    kvh = head // G
    kbase = kc_ptr + kvh.to(tl.int64) * s_ch
    vbase = vc_ptr + kvh.to(tl.int64) * s_ch
    table = bt_ptr + b * stride_btb
    # finite start: a query whose first key tiles are all outside its window stays at 0
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        km = offs < hi
        blk = tl.load(table + (offs // BLOCK_SIZE) * stride_btn, mask=km, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + offs % BLOCK_SIZE      # [BLOCK_N]
        kv_off = slot[:, None] * s_cs + d[None, :]
        kvm = km[:, None] & dm[None, :]
        k = tl.load(kbase + kv_off, mask=kvm, other=0.0)             # [BLOCK_N, BLOCK_D]
        v = tl.load(vbase + kv_off, mask=kvm, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if SOFTCAP > 0:                                               # cap * tanh(s / cap)
            t = tl.exp(-2.0 * tl.abs(s / SOFTCAP))
            s = tl.where(s < 0, -SOFTCAP, SOFTCAP) * (1.0 - t) / (1.0 + t)
        seen = km[None, :] & (offs[None, :] <= pos[:, None])
        if window > 0:
            seen = seen & (offs[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))                         # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]                       # padding tiles: 0
    tl.store(out_ptr + (b * S + i)[:, None] * stride_ot + head * D + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=im[:, None] & dm[None, :])


def _check_inputs(q, k_cache, v_cache, block_tables, positions, block_size) -> None:
    """Raise ValueError naming the first input prefill_attention cannot take."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must be [num_slots, kv_heads, head_dim] of one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_slots, kvh, D = k_cache.shape
    if q.dim() != 2 or q.shape[1] % D or (q.shape[1] // D) % kvh:
        raise ValueError(f"q width {q.shape[-1]} is not heads*head_dim with head_dim {D} and "
                         f"a multiple of {kvh} kv heads")
    if q.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("prefill_attention needs unit last strides and caches of one layout")
    if positions.dim() != 2 or q.shape[0] != positions.numel():
        raise ValueError(f"positions must be [B, S] with B*S = {q.shape[0]} queries, got "
                         f"{tuple(positions.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != positions.shape[0]:
        raise ValueError(f"block_tables must be [{positions.shape[0]}, max_blocks], got "
                         f"{tuple(block_tables.shape)}")
    if block_size < 1 or num_slots % block_size:
        raise ValueError(f"block_size {block_size} must be positive and divide the caches' "
                         f"{num_slots} slots")


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                      *, scale: float | None = None, window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Attention of a prefill step's queries over their sequences' keys in a paged KV cache.

    Parameters
    ----------
    q : [B*S, h*D], row b's S queries in turn; rows may be strided, unit last stride.
    k_cache, v_cache : [num_slots, kvh, D] holding every query's own key already.
    block_tables : [B, max_blocks] int; row b's physical block ids in key order, covering
        its last position. Entries past that are never read.
    positions : [B, S] int, non-decreasing along each row; padding repeats the row's last
        position. Query (b, i) attends to keys 0..positions[b, i] (the last ``window`` of
        them if given).
    block_size : keys per block (a compile-time constant of the kernel).
    scale : logit scale, D**-0.5 by default.
    window : sliding window in keys, the query's own key included.
    softcap : caps the scaled logits at cap * tanh(s / cap).

    Returns
    -------
    out : [B*S, h*D] in q's dtype; a tile of BLOCK_M padding queries is left zero, any other
        padding query attends as a query at its row's last position.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, positions, block_size)
    B, S = positions.shape
    _, kvh, D = k_cache.shape
    h = q.shape[1] // D
    out = torch.zeros(B * S, h * D, dtype=q.dtype, device=q.device)
    if B * S == 0:
        return out
    _prefill_attn_kernel[(h, triton.cdiv(S, BLOCK_M), B)](
        q, k_cache, v_cache, block_tables, positions, out, S,
        q.stride(0), block_tables.stride(0), block_tables.stride(1), positions.stride(0),
        positions.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0),
        scale or D ** -0.5, window or 0, SOFTCAP=float(softcap or 0.0), G=h // kvh, D=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_SIZE=block_size, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out
