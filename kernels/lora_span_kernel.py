"""Triton kernels of the span path: LoRA over tiles of slot-sorted tokens, looping over slots.

A tile is BLOCK_M consecutive positions of the slot-sorted token order (LoRAMeta), so its
tokens use the few slots between the tile's first and last slot ("the span"). A program
loads its rows once and, for each slot of the span, multiplies the rows of that slot (the
others masked to zero) by that slot's weight tile: every weight tile is read by the one or
two tiles whose span holds its slot, y is read and written once, and the tile height does
not depend on how many tokens a slot has. Slots of the span without tokens in the tile load
nothing (masked loads). Grids depend on host constants only (CUDA-graph safe).
"""
from __future__ import annotations

import triton
import triton.language as tl

# UPCAST: under TRITON_INTERPRET, tl.dot multiplies bfloat16 operands as raw bits, so the
# operands are widened to float32 there (exact for bf16/fp16), as in kernels/triton_kernels.py.


@triton.jit
def _tile_rows(sorted_slots_ptr, sorted_ptr, tile, T, L, BLOCK_M: tl.constexpr):
    """Rows of one tile: sorted positions, their slots (L = none), token ids, span lo..hi."""
    offs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs, mask=offs < T, other=L)
    has = slots < L
    tok = tl.load(sorted_ptr + offs, mask=has, other=0).to(tl.int64)
    lo = tl.min(tl.where(has, slots, L), 0)
    hi = tl.max(tl.where(has, slots, -1), 0)
    return offs, slots, has, tok, lo, hi


@triton.jit
def _masked_if(mask, count):
    """mask & (count > 0) for a scalar count (built as a tensor: the CPU interpreter mistypes
    a scalar int1 combined with a tensor)."""
    return mask & ((mask.to(tl.int32) * 0 + count) > 0)


@triton.jit
def span_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, work_ptr, sorted_ptr, sorted_slots_ptr,
    T, H, R, L, k_per_split,
    s_xt, s_xh, s_al, s_ar, s_ah, s_wk, s_ws, s_wt,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """work[kp, s, i, :] = x[tok_i, k-part] @ A_s[slot_i][:, k-part].T for sorted position i."""
    tile = tl.program_id(0)
    sid = tl.program_id(1)
    kp = tl.program_id(2)
    offs, slots, has, tok, lo, hi = _tile_rows(sorted_slots_ptr, sorted_ptr, tile, T, L, BLOCK_M)
    if hi >= 0:
        if sid == 0:
            a_ptr = a0_ptr
        elif sid == 1:
            a_ptr = a1_ptr
        else:
            a_ptr = a2_ptr
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        k_start = kp * k_per_split
        k_end = tl.minimum(H, k_start + k_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        x_rows = x_ptr + tok[:, None] * s_xt
        a_cols = a_ptr + offs_r[None, :] * s_ar
        for k in range(k_start, k_end, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            xt = tl.load(x_rows + offs_k[None, :] * s_xh, mask=has[:, None] & mask_k[None, :],
                         other=0.0)                                           # [BM, BK]
            a_tile = a_cols + lo.to(tl.int64) * s_al + offs_k[:, None] * s_ah
            for slot in range(lo, hi + 1):      # a_tile: slot's A (64-bit pointer steps)
                here = slots == slot
                present = tl.max(here.to(tl.int32), 0)
                at = tl.load(a_tile, mask=_masked_if(mask_k[:, None] & mask_r[None, :], present),
                             other=0.0)                                       # [BK, BR]
                xm = tl.where(here[:, None], xt, tl.zeros_like(xt))
                if UPCAST:
                    acc = tl.dot(xm.to(tl.float32), at.to(tl.float32), acc,
                                 input_precision=PRECISION)
                else:
                    acc = tl.dot(xm.to(at.dtype), at, acc, input_precision=PRECISION)
                a_tile += s_al
        w_ptrs = work_ptr + kp * s_wk + sid * s_ws + offs[:, None] * s_wt + offs_r[None, :]
        tl.store(w_ptrs, acc, mask=has[:, None] & mask_r[None, :])


@triton.jit
def span_expand_kernel(
    work_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, sorted_ptr, sorted_slots_ptr,
    T, R, L, n0, n1, n2, off0, off1, off2, tiles0, tiles01,
    s_wk, s_ws, s_wt,
    s_bl0, s_bn0, s_br0, s_bl1, s_bn1, s_br1, s_bl2, s_bn2, s_br2,
    s_yt, s_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[tok_i, off_s + cols] += sum_kp(work[kp, s, i]) @ B_s[slot_i][cols].T.

    Axis 1 enumerates the column tiles of all slices back to back (tiles0, tiles01: the
    cumulative tile counts of slices 0 and 0..1).
    """
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n < tiles0:
        sid = 0
        b_ptr = b0_ptr
        n_tile = pid_n
        N = n0
        col0 = off0
        s_bl = s_bl0
        s_bn = s_bn0
        s_br = s_br0
    elif pid_n < tiles01:
        sid = 1
        b_ptr = b1_ptr
        n_tile = pid_n - tiles0
        N = n1
        col0 = off1
        s_bl = s_bl1
        s_bn = s_bn1
        s_br = s_br1
    else:
        sid = 2
        b_ptr = b2_ptr
        n_tile = pid_n - tiles01
        N = n2
        col0 = off2
        s_bl = s_bl2
        s_bn = s_bn2
        s_br = s_br2
    offs, slots, has, tok, lo, hi = _tile_rows(sorted_slots_ptr, sorted_ptr, tile, T, L, BLOCK_M)
    if hi >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # y does not depend on the shrink: its load is issued first, to overlap the rest
        y_ptrs = y_ptr + tok[:, None] * s_yt + (col0 + offs_n)[None, :] * s_yn
        mask_y = has[:, None] & mask_n[None, :]
        yt = tl.load(y_ptrs, mask=mask_y, other=0.0)                          # [BM, BN]
        it = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        w_ptrs = work_ptr + sid * s_ws + offs[:, None] * s_wt + offs_r[None, :]
        for p in tl.static_range(SPLIT_K):      # the shrink's split partial sums
            it += tl.load(w_ptrs + p * s_wk, mask=has[:, None] & mask_r[None, :], other=0.0)
        it_b = it.to(b_ptr.dtype.element_ty)    # rounded to the weights' dtype, as torch_ref
        if UPCAST:
            it_b = it_b.to(tl.float32)
        b_tile = b_ptr + lo.to(tl.int64) * s_bl + offs_r[:, None] * s_br + offs_n[None, :] * s_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for slot in range(lo, hi + 1):          # b_tile: slot's B tile (64-bit pointer steps)
            here = slots == slot
            present = tl.max(here.to(tl.int32), 0)
            bt = tl.load(b_tile, mask=_masked_if(mask_r[:, None] & mask_n[None, :], present),
                         other=0.0)                                           # [BR, BN]
            im = tl.where(here[:, None], it_b, tl.zeros_like(it_b))
            if UPCAST:
                acc = tl.dot(im, bt.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(im, bt, acc, input_precision=PRECISION)
            b_tile += s_bl
        tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask_y)
