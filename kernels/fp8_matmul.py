"""W8A8 float8 e4m3 GEMM with per-row input scales and per-channel weight scales (Triton).

``fp8_matmul(xq, sx, w, sw)`` = (xq @ w.T) * sx * sw in the output dtype: the product of
engine.quant.onthefly.Fp8Linear, which torch runs as ``torch._scaled_mm`` with row-wise
scales. At decode's row counts (M up to a few hundred) that GEMM reads the weight once and
is bound by memory; torch's row-wise kernel reached 1.2-1.8 TB/s of an H100's weight read at
M = 256 where bf16's cuBLAS reached 2.0-2.2 (benchmarks/fp8_gemm.py), so fp8's halved bytes
bought far less than half the time. This kernel tiles N finely enough that a skinny M still
spreads the weight over every SM, streams K through a deep pipeline, accumulates in fp32
and applies both scales in the epilogue: on an H100 it took 13-19% less GPU time than the
row-wise kernel at 16-64 rows, but twice its time at 256 (64-row tiles read the weight once
each; no wider tile found in a sweep beat row-wise there), hence Fp8Linear.GEMM "auto".

Config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by M, N and the device's shared
memory (``config_for``); CONFIG (non-empty) overrides it for sweeps (benchmarks/fp8_gemm.py).
No host sync; graph-capturable. On CPU it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorry.kernels.device_info import max_shared_mem
from lorry.kernels.launch_math import cdiv

CONFIG: tuple = ()     # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for A/B runs


@triton.jit
def _fp8_matmul_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, out_ptr, M, N, K,
                       stride_xm, stride_wn, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
            b = tl.load(w_cols + kk[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k_ok = kk < K
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        # Hopper's fp8 MMA accumulates in less than fp32: at most BLOCK_K products there,
        # then added into the fp32 accumulator (as CUTLASS's promotion interval)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
    sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    acc = acc * sx[:, None] * sw[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def config_for(M: int, N: int, K: int, smem: int = 0) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an [M, K] x [K, N] product on a
    device whose programs may take ``smem`` bytes of shared memory (0: no limit, the CPU
    interpreter).

    Rows: one M tile up to 64 rows (the weight is read once per M tile, so a skinny M wants
    a single tile), 64-row tiles above. Columns: 64 per program while that gives at least
    two programs per SM of an H100 (132), else 32. Stages: 4, fewer (then a shorter K tile)
    where the A and B tiles of 4 would not fit ``smem`` (an Ada GPU's ~99 KiB)."""
    if CONFIG:
        return CONFIG
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if cdiv(N, 64) * cdiv(M, block_m) >= 264 else 32
    block_k = min(256, max(64, triton.next_power_of_2(K)))
    stages = 4
    while smem and stages * (block_m + block_n) * block_k + 8 * 1024 > smem:
        if stages > 2:
            stages -= 1
        elif block_k > 64:
            block_k //= 2
        else:
            break
    return block_m, block_n, block_k, 4, stages


def fp8_matmul(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """xq [M, K] e4m3, sx [M, 1] or [M] fp32, w [N, K] e4m3 (rows: output channels), sw
    [1, N] or [N] fp32 -> [M, N] ``out_dtype`` = (xq @ w.T) * sx * sw, fp32 accumulation."""
    M, K = xq.shape
    N = w.shape[0]
    if w.shape[1] != K or xq.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"fp8_matmul needs xq [M, K] and w [N, K] with unit last strides, got "
                         f"{tuple(xq.shape)} and {tuple(w.shape)}")
    if sx.numel() != M or sw.numel() != N:
        raise ValueError(f"fp8_matmul needs {M} row scales and {N} column scales, got "
                         f"{sx.numel()} and {sw.numel()}")
    if xq.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_matmul needs float8_e4m3fn operands, got {xq.dtype} and "
                         f"{w.dtype}")
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    bm, bn, bk, warps, stages = config_for(M, N, K, max_shared_mem(xq.device))
    # the kernel indexes the scales densely: fp32, one after another
    sx, sw = (t.reshape(-1).float().contiguous() for t in (sx, sw))
    _fp8_matmul_kernel[(cdiv(N, bn), cdiv(M, bm))](
        xq, w, sx, sw, out, M, N, K, xq.stride(0), w.stride(0),
        out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0,
        num_warps=warps, num_stages=stages)
    return out
