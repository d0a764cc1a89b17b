"""Triton kernels for multi-adapter LoRA shrink and expand over slot-sorted token segments.

Grid axis 0 enumerates token tiles of all slots (each slot's tokens cut into BLOCK_M rows);
every program finds its slot and tile from the per-slot counts in device memory, so the grid
depends on host constants only and the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import triton
import triton.language as tl

# UPCAST: the Triton interpreter multiplies bfloat16 operands as raw uint16 bits, so under
# TRITON_INTERPRET the operands of tl.dot are widened to float32 first (exact for bf16/fp16).


@triton.jit
def _find_tile(pid_m, counts_ptr, starts_ptr, L, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """Map global tile index -> (slot, first row in the slot's segment, rows in the slot)."""
    offs_l = tl.arange(0, BLOCK_L)
    counts = tl.load(counts_ptr + offs_l, mask=offs_l < L, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    # Slots before ours are those whose tiles end at or before pid_m.
    slot = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    is_slot = offs_l == slot
    first_tile = tl.sum(tl.where(is_slot, tile_end - tiles, 0), 0)
    count = tl.sum(tl.where(is_slot, counts, 0), 0)
    start = tl.load(starts_ptr + slot, mask=slot < L, other=0)
    return slot, (pid_m - first_tile) * BLOCK_M, count, start


@triton.jit
def _slot_place(rows_ptr, slot, L, R, HAS_ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """(position, rank) of a slot's adapter in the weights. Per-slot stacks (no HAS_ROWS):
    the slot index, and R. Slot memory shared by rank (kernels.segments.SlotRows at
    ``rows_ptr``): the adapter's first row (a multiple of ROW_ALIGN, which keeps loads along
    a unit-stride rank axis vectorized) and its rank rounded up to a multiple of 16 (the rows
    past a rank are zero), at most R: a mask constant over 16 ranks keeps them vectorized too."""
    if HAS_ROWS:
        pos = tl.multiple_of(tl.load(rows_ptr + slot), ROW_ALIGN).to(tl.int64)
        r = tl.load(rows_ptr + L + slot)
        rank = tl.minimum((r + 15) // 16 * 16, R)
    else:
        pos = slot.to(tl.int64)
        rank = R
    return pos, rank


@triton.jit
def lora_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr, sorted_ptr, counts_ptr, starts_ptr, rows_ptr,
    H, R, L,
    s_xt, s_xh, s_al, s_ar, s_ah, s_osplit, s_oslice, s_ot, s_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_ROWS: tl.constexpr = False, ROW_ALIGN: tl.constexpr = 1,
):
    """out[split, s, t, :] (+)= x[t, k-part] @ A_s[slot(t)][:, k-part].T for tokens with a slot.
    HAS_ROWS: A is a row buffer and each slot's place and rank come from ``rows_ptr``
    (_slot_place); columns past the rank are neither read nor written."""
    pid_m = tl.program_id(0)
    pid_nk = tl.program_id(1)
    sid = tl.program_id(2)
    pid_k = pid_nk % SPLIT_K
    pid_n = pid_nk // SPLIT_K
    slot, row0, count, start = _find_tile(pid_m, counts_ptr, starts_ptr, L, BLOCK_M, BLOCK_L)
    if slot >= L:
        return
    pos, rank = _slot_place(rows_ptr, slot, L, R, HAS_ROWS, ROW_ALIGN)
    if pid_n * BLOCK_N >= rank:
        return
    if sid == 0:
        a_ptr = a0_ptr
    elif sid == 1:
        a_ptr = a1_ptr
    else:
        a_ptr = a2_ptr
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tok = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    x_rows = x_ptr + tok[:, None] * s_xt
    a_cols = a_ptr + pos * s_al + offs_n[None, :] * s_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(pid_k * BLOCK_K, H, SPLIT_K * BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        xt = tl.load(x_rows + offs_k[None, :] * s_xh, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)                                              # [BM, BK]
        at = tl.load(a_cols + offs_k[:, None] * s_ah, mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0)                                              # [BK, BN]
        if UPCAST:
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xt.to(at.dtype), at, acc, input_precision=PRECISION)
    o_ptrs = (out_ptr + pid_k * s_osplit + sid * s_oslice + tok[:, None] * s_ot
              + offs_n[None, :] * s_or)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _pick(in1, in2, v0, v1, v2):
    """v0, v1 or v2 for slice 0, 1 (in1) or 2 (in2), by select: values merged from branches
    lose what the compiler knows of their divisibility, and loads using them would not
    vectorize."""
    return tl.where(in2, v2, tl.where(in1, v1, v0))


@triton.jit
def _pick_ptr(in1, in2, p0, p1, p2):
    """The slice's tensor pointer (pointers are picked by branches)."""
    if in2:
        p = p2
    elif in1:
        p = p1
    else:
        p = p0
    return p


@triton.jit
def _expand_tile(i_rows, b_cols, mask_m, mask_n, R, s_isplit, s_ir, s_br,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32: the SPLIT_K partial products at ``i_rows`` summed, times the
    weight tile at ``b_cols`` transposed, over the rank R in BLOCK_R steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Each step multiplies the weight tile loaded before it and loads the next one (the last
    # load is masked off), so a tile's load is in flight during the partial sums' loads.
    offs_r = tl.arange(0, BLOCK_R)
    bt = tl.load(b_cols + offs_r[:, None] * s_br, mask=(offs_r < R)[:, None] & mask_n[None, :],
                 other=0.0)                                                  # [BR, BN]
    for r in range(0, R, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        it = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # Split-K partial sums of the shrink are added here, so no extra reduction launch.
        for p in range(SPLIT_K):
            it += tl.load(i_rows + p * s_isplit + offs_r[None, :] * s_ir,
                          mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        if UPCAST:
            acc = tl.dot(it.to(bt.dtype).to(tl.float32), bt.to(tl.float32), acc,
                         input_precision=PRECISION)
        else:
            acc = tl.dot(it.to(bt.dtype), bt, acc, input_precision=PRECISION)
        nxt = offs_r + BLOCK_R
        bt = tl.load(b_cols + nxt[:, None] * s_br, mask=(nxt < R)[:, None] & mask_n[None, :],
                     other=0.0)
    return acc


# tile counts of the slices (the second flips between classes with the step's BLOCK_N):
# kept from Triton's specialization, as lora_decode_kernel's work counts
EXPAND_UNSPECIALIZED = ("tiles0", "tiles01")


@triton.jit(do_not_specialize=EXPAND_UNSPECIALIZED)
def lora_expand_kernel(
    inter_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, sorted_ptr, counts_ptr, starts_ptr, rows_ptr,
    R, L, n0, n1, n2, off0, off1, off2, tiles0, tiles01,
    s_isplit, s_islice, s_it, s_ir, s_il,
    s_bl0, s_bn0, s_br0, s_bl1, s_bn1, s_br1, s_bl2, s_bn2, s_br2,
    s_yt, s_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_ROWS: tl.constexpr = False, ROW_ALIGN: tl.constexpr = 1,
):
    """y[t, off_s + n] += sum_split(inter[split, s, t]) @ B_s[slot(t)][n].T for tokens with a slot.

    Axis 1 enumerates the column tiles of all slices back to back (tiles0, tiles01 are the
    cumulative tile counts of slices 0 and 0..1), so unequal widths waste no programs.
    ``s_il``: stride of the slot's position in ``inter`` (0: one row per token; R, or 1 with
    HAS_ROWS: every slot's products side by side, as the base matmul with the A rows folded
    in writes them). HAS_ROWS: as in lora_shrink_kernel (B is a row buffer).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    in1 = pid_n >= tiles0
    in2 = pid_n >= tiles01
    sid = in1.to(tl.int32) + in2.to(tl.int32)
    n_tile = pid_n - _pick(in1, in2, 0, tiles0, tiles01)
    N = _pick(in1, in2, n0, n1, n2)
    col0 = _pick(in1, in2, off0, off1, off2)
    s_bl = _pick(in1, in2, s_bl0, s_bl1, s_bl2)
    s_bn = _pick(in1, in2, s_bn0, s_bn1, s_bn2)
    s_br = _pick(in1, in2, s_br0, s_br1, s_br2)
    b_ptr = _pick_ptr(in1, in2, b0_ptr, b1_ptr, b2_ptr)
    slot, row0, count, start = _find_tile(pid_m, counts_ptr, starts_ptr, L, BLOCK_M, BLOCK_L)
    if slot >= L:
        return
    pos, rank = _slot_place(rows_ptr, slot, L, R, HAS_ROWS, ROW_ALIGN)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tok = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    i_rows = inter_ptr + sid * s_islice + pos * s_il + tok[:, None] * s_it
    b_cols = b_ptr + pos * s_bl + offs_n[None, :] * s_bn
    acc = _expand_tile(i_rows, b_cols, mask_m, mask_n, rank, s_isplit, s_ir, s_br, BLOCK_M,
                       BLOCK_N, BLOCK_R, SPLIT_K, PRECISION, UPCAST)
    y_ptrs = y_ptr + tok[:, None] * s_yt + (col0 + offs_n)[None, :] * s_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)
