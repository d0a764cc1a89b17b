"""Triton kernel for multi-adapter LoRA on decode steps and prefill chunks: shrink and
expand items, in two launches of the same kernel (PHASE 1: shrink items, PHASE 2: expand
items).

Work items (one per program) are numbered: first the shrink items (m-tile, slice, k-part),
then the expand items (m-tile, column chunk of one slice). An m-tile is up to ROWS tokens of
one slot, read from the step's tile table in device memory (kernels.segments.tile_table), so
the grid depends on host constants only and the launch can be captured in a CUDA graph. A
shrink item stores its partial product [ROWS, R]; an expand item sums the SPLIT_K partials of
its m-tile and slice and streams its columns.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorry.kernels.triton_kernels import _pick, _pick_ptr, _slot_place


@triton.jit
def _tile(m, table_ptr, rows, ROWS: tl.constexpr):
    """Tile m of kernels.segments.tile_table: (slot, token ids [BLOCK_M] int64, valid rows);
    the slot and the tokens are loaded together, so they cost one memory round trip."""
    row = table_ptr + m * (ROWS + 1)
    tok = tl.load(row + 1 + rows, mask=rows < ROWS, other=-1)
    slot = tl.load(row)
    mask_m = tok >= 0
    return slot, tl.where(mask_m, tok, 0).to(tl.int64), mask_m


@triton.jit
def _add_tile(y_ptrs, mask, yt, it_b, bt, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """y tile (loaded as yt) += it_b @ bt, stored back."""
    if UPCAST:
        acc = tl.dot(it_b, bt.to(tl.float32), input_precision=PRECISION)
    else:
        acc = tl.dot(it_b, bt, input_precision=PRECISION)
    tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _products(w_ptrs, w_mask, s_wk, dtype: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr,
              UPCAST: tl.constexpr):
    """An expand item's [BLOCK_M, BLOCK_R] products x·Aᵀ (the sum of the SPLIT_K partial
    products at w_ptrs, s_wk apart) in the weights' dtype, once the shrink has written them
    (with PDL: after the wait for the shrink launch)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    it = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for p in tl.static_range(SPLIT_K):
        # .cg: the partial sums were written by another launch (the shrink, or the base matmul).
        it += tl.load(w_ptrs + p * s_wk, mask=w_mask, other=0.0, cache_modifier=".cg")
    it_b = it.to(dtype)
    if UPCAST:
        it_b = it_b.to(tl.float32)
    return it_b


# The work counts change with the step's tokens: kept from Triton's specialization on ==1 and
# %16 (each new class compiled the kernel again mid-run; they only split the program id and
# bound loops, so no load loses an alignment fact); strides and offsets stay specialized.
UNSPECIALIZED = ("cc0", "cc01", "cc_all", "first_item", "n_shrink", "nsub")


# Long by design: both PHASEs share one signature; item helpers would re-pass 20-30 of its args.
@triton.jit(do_not_specialize=UNSPECIALIZED)
def lora_decode_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, work_ptr,
    table_ptr, rows_ptr,
    H, R, L, n0, n1, n2, off0, off1, off2,
    cc0, cc01, cc_all, first_item, n_shrink, nsub,
    s_xt, s_xh, s_al, s_ar, s_ah,
    s_bl0, s_bn0, s_bl1, s_bn1, s_bl2, s_bn2,
    s_yt, s_yn, s_wk, s_ws, s_wt, s_wl,
    NUM_SLICES: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, PHASE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXPAND_LOOP: tl.constexpr = 0,
    STAGES: tl.constexpr = 2, USE_PDL: tl.constexpr = False, HAS_ROWS: tl.constexpr = False,
    ROW_ALIGN: tl.constexpr = 1,
):
    # HAS_ROWS: the weights are row buffers; a slot's first row and rank come from rows_ptr
    # (triton_kernels._slot_place), and its A rows, B columns and products past the rank are
    # neither read nor written
    t = first_item + tl.program_id(0)
    if USE_PDL and PHASE == 1:
        # launched while the kernel before it finishes: its outputs (x) are ready after this
        tl.extra.cuda.gdc_wait()
        # The expand launch may start now. Its programs load weights and y before they wait
        # for this launch to finish; y, like x, is ready by now (the wait above).
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # PHASE 1 / 2: a launch of shrink / expand items only (the other branch is not compiled,
    # so it costs no registers)
    if PHASE == 1:
        # ---- shrink item: work[kp, sid, tok, :] = x[tok, k-part] @ A_sid[slot][:, k-part].T
        m = t // (NUM_SLICES * SPLIT_K)
        rem = t % (NUM_SLICES * SPLIT_K)
        sid = rem // SPLIT_K
        kp = rem % SPLIT_K
        slot, tok, mask_m = _tile(m, table_ptr, rows, ROWS)
        if slot < L:
            pos, rank = _slot_place(rows_ptr, slot, L, R, HAS_ROWS, ROW_ALIGN)
            if HAS_ROWS:
                mask_r = offs_r < rank
            if sid == 0:
                a_ptr = a0_ptr
            elif sid == 1:
                a_ptr = a1_ptr
            else:
                a_ptr = a2_ptr
            x_rows = x_ptr + tok[:, None] * s_xt
            a_cols = a_ptr + pos * s_al + offs_r[None, :] * s_ar
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(kp * BLOCK_K, H, SPLIT_K * BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                mask_k = offs_k < H
                xt = tl.load(x_rows + offs_k[None, :] * s_xh,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)   # [BM, BK]
                at = tl.load(a_cols + offs_k[:, None] * s_ah,
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0)   # [BK, BR]
                if UPCAST:
                    acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc,
                                 input_precision=PRECISION)
                else:
                    acc = tl.dot(xt.to(at.dtype), at, acc, input_precision=PRECISION)
            w_ptrs = work_ptr + kp * s_wk + sid * s_ws + tok[:, None] * s_wt + offs_r[None, :]
            tl.store(w_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])
    else:
        # ---- expand item: y[tok, cols] += sum_kp(work[kp, sid, tok]) @ B_sid[slot][cols].T
        e = t - n_shrink
        m = e // cc_all
        c = e % cc_all
        in1 = c >= cc0
        in2 = c >= cc01
        sid = in1.to(tl.int32) + in2.to(tl.int32)
        c_local = c - _pick(in1, in2, 0, cc0, cc01)
        N = _pick(in1, in2, n0, n1, n2)
        col0 = _pick(in1, in2, off0, off1, off2)
        s_bl = _pick(in1, in2, s_bl0, s_bl1, s_bl2)
        s_bn = _pick(in1, in2, s_bn0, s_bn1, s_bn2)
        b_ptr = _pick_ptr(in1, in2, b0_ptr, b1_ptr, b2_ptr)
        slot, tok, mask_m = _tile(m, table_ptr, rows, ROWS)
        if slot < L:
            pos, rank = _slot_place(rows_ptr, slot, L, R, HAS_ROWS, ROW_ALIGN)
            if HAS_ROWS:
                mask_r = offs_r < rank
            # EXPAND_LOOP 0 (by hand) and 2 (the pipeline's prologue) read the first tiles'
            # weights and y before waiting for the shrink (the PDL wait): they do not depend
            # on it, so their latency overlaps.
            b_cols = b_ptr + pos * s_bl + offs_r[:, None]                   # unit rank stride
            n_first = c_local * nsub * BLOCK_N
            offs_n = n_first + tl.arange(0, BLOCK_N)
            n_end = tl.minimum(N, n_first + nsub * BLOCK_N)     # this chunk's columns
            mask_n = offs_n < n_end
            y_rows = y_ptr + tok[:, None] * s_yt
            if EXPAND_LOOP == 0:
                bt = tl.load(b_cols + offs_n[None, :] * s_bn,
                             mask=mask_r[:, None] & mask_n[None, :], other=0.0)      # [BR, BN]
                yt = tl.load(y_rows + (col0 + offs_n)[None, :] * s_yn,
                             mask=mask_m[:, None] & mask_n[None, :], other=0.0)   # [BM, BN]
            # s_wl: the stride of the slot's position in work (0, or R -- 1 with HAS_ROWS --
            # where every slot's products lie side by side, as the base matmul with the A rows
            # folded in writes them)
            w_ptrs = (work_ptr + sid * s_ws + pos * s_wl + tok[:, None] * s_wt
                      + offs_r[None, :])
            w_mask = mask_m[:, None] & mask_r[None, :]
            if EXPAND_LOOP < 2:
                it_b = _products(w_ptrs, w_mask, s_wk, b_ptr.dtype.element_ty, BLOCK_M,
                                 BLOCK_R, SPLIT_K, USE_PDL, UPCAST)
            if EXPAND_LOOP == 0:
                for j in range(nsub):
                    # Next tile's loads are issued before this tile's product (1-deep prefetch).
                    nxt = offs_n + BLOCK_N
                    mask_nxt = nxt < n_end
                    b_next = tl.load(b_cols + nxt[None, :] * s_bn,
                                     mask=mask_r[:, None] & mask_nxt[None, :], other=0.0)
                    y_next = tl.load(y_rows + (col0 + nxt)[None, :] * s_yn,
                                     mask=mask_m[:, None] & mask_nxt[None, :], other=0.0)
                    _add_tile(y_rows + (col0 + offs_n)[None, :] * s_yn,
                              mask_m[:, None] & mask_n[None, :], yt, it_b, bt, PRECISION,
                              UPCAST)
                    bt = b_next
                    yt = y_next
                    offs_n = nxt
                    mask_n = mask_nxt
            if EXPAND_LOOP >= 1:
                # The compiler's software pipeline keeps STAGES tiles' loads in flight.
                # EXPAND_LOOP 2: the wait for the products is in the first iteration, so the
                # loads the pipeline issues before the loop (weights and y of the first
                # STAGES - 1 tiles, which do not depend on the shrink) go out before it.
                if EXPAND_LOOP == 2:
                    it_b = tl.zeros((BLOCK_M, BLOCK_R), dtype=b_ptr.dtype.element_ty)
                    if UPCAST:
                        it_b = it_b.to(tl.float32)
                for j in tl.range(0, nsub, num_stages=STAGES):
                    cols = n_first + j * BLOCK_N + tl.arange(0, BLOCK_N)
                    mask_c = cols < n_end
                    bj = tl.load(b_cols + cols[None, :] * s_bn,
                                 mask=mask_r[:, None] & mask_c[None, :], other=0.0)
                    yj = tl.load(y_rows + (col0 + cols)[None, :] * s_yn,
                                 mask=mask_m[:, None] & mask_c[None, :], other=0.0)
                    if EXPAND_LOOP == 2:  # noqa: SIM102 (compile-time, then run-time)
                        if j == 0:
                            it_b = _products(w_ptrs, w_mask, s_wk, b_ptr.dtype.element_ty,
                                             BLOCK_M, BLOCK_R, SPLIT_K, USE_PDL, UPCAST)
                    _add_tile(y_rows + (col0 + cols)[None, :] * s_yn,
                              mask_m[:, None] & mask_c[None, :], yj, it_b, bj, PRECISION,
                              UPCAST)
