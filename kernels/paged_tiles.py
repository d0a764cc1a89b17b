"""Pieces the paged attention kernels share (kernels.decode_attention,
kernels.prefill_attention): their input checks, and in Triton a tile of keys and values
gathered through a block table, the scaled (soft-capped) logits, one online-softmax update."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def check_paged(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_size: int) -> None:
    """Raise ValueError naming the first of q [*, h*D], the caches [num_slots, kvh, D] and
    ``block_size`` that the kernel ``name`` cannot take."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must be [num_slots, kv_heads, head_dim] of one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_slots, kvh, D = k_cache.shape
    if q.dim() != 2 or q.shape[1] % D or (q.shape[1] // D) % kvh:
        raise ValueError(f"q width {q.shape[-1]} is not heads*head_dim with head_dim {D} and "
                         f"a multiple of {kvh} kv heads")
    if q.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"{name} needs unit last strides and caches of one layout")
    if block_size < 1 or num_slots % block_size:
        raise ValueError(f"block_size {block_size} must be positive and divide the caches' "
                         f"{num_slots} slots")


@triton.jit
def kv_tile(table, kbase, vbase, offs, hi, d, dm, stride_btn, s_cs, BLOCK_SIZE: tl.constexpr):
    """Keys and values [BLOCK_N, BLOCK_D] of one sequence at positions ``offs`` below ``hi``:
    position p lives at slot table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE (zero past
    ``hi``) -> (k, v, offs < hi), in the cache's dtype (the caller widens an fp8 cache's)."""
    km = offs < hi
    blk = tl.load(table + (offs // BLOCK_SIZE) * stride_btn, mask=km, other=0)
    slot = blk.to(tl.int64) * BLOCK_SIZE + offs % BLOCK_SIZE
    kv_off = slot[:, None] * s_cs + d[None, :]
    kvm = km[:, None] & dm[None, :]
    return (tl.load(kbase + kv_off, mask=kvm, other=0.0),
            tl.load(vbase + kv_off, mask=kvm, other=0.0), km)


@triton.jit
def to_cache(x, CACHE_TY: tl.constexpr):
    """``x`` as a cache of dtype CACHE_TY stores it: float8 e4m3 rounded to nearest even and
    saturating at +-448 (NaN kept), bit for bit as torch's conversion after a clamp to +-448
    (torch's CUDA conversion makes NaN past 448); built from the fp32 bits (Triton's CPU
    interpreter loses the carry of a rounding into the exponent: 126.5 became 64); other
    dtypes convert as tl.store would."""
    if CACHE_TY == tl.float8e4nv:
        f = x.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        a = bits & 0x7FFFFFFF                                  # |x|
        # normal: exponent re-biased (127 -> 7) and 3 mantissa bits, rounded half to even
        # (a carry moves into the exponent)
        r = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # below 2**-6: multiples of 2**-9, rounded half to even by the 2**23 trick
        small = a < 0x3C800000
        sub = ((tl.where(small, tl.abs(f), 0.0) * 512.0 + 8388608.0) - 8388608.0)
        r = tl.where(small, sub.to(tl.uint32), r)
        r = tl.where(a >= 0x43E00000, 0x7E, r)                  # >= 448: 448 (saturated)
        r = tl.where(a > 0x7F800000, 0x7F, r)                   # NaN
        return (r | ((bits >> 24) & 0x80)).to(tl.uint8).to(CACHE_TY, bitcast=True)
    return x.to(CACHE_TY)


FP8_CACHES = (torch.float8_e4m3fn, torch.float8_e5m2)
# False: a bf16 query's dots over an fp8 cache run in bf16 (the cache widened to bf16), for
# the A/B of benchmarks/prefill_attn_sweep.py and decode_step.py
FP8_DOTS_IN_FP16 = True


def query_compute(q: torch.Tensor, k_cache: torch.Tensor, scale: float) -> tuple[bool, float]:
    """(F16, q_shift) of an attention launch: F16 when a bf16 query meets an fp8 cache, whose
    keys and values the kernel then widens to fp16 (one conversion instruction per two values
    on Hopper; to bf16 it takes three) and whose query it takes in fp16 times ``q_shift``, the
    power of two nearest ``scale``: an exact product that keeps the query far from fp16's
    largest value, the rest of the scale applied to the fp32 logits."""
    f16 = FP8_DOTS_IN_FP16 and k_cache.dtype in FP8_CACHES and q.dtype == torch.bfloat16
    return f16, 2.0 ** round(math.log2(scale)) if f16 else 1.0


@triton.jit
def query_for_cache(q, scale, q_shift, F16: tl.constexpr):
    """The query tile and the logit scale as the dots take them (``query_compute``): with
    F16, q * q_shift in fp16 and scale / q_shift; else as given."""
    if F16:   # one return: the compiler types every return statement, whatever F16 is
        q = (q.to(tl.float32) * q_shift).to(tl.float16)
        scale = scale / q_shift
    return q, scale


@triton.jit
def logits(q, k, scale, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """q [M, BLOCK_D] . k [BLOCK_N, BLOCK_D]^T, scaled; capped at SOFTCAP * tanh(s / SOFTCAP)
    when SOFTCAP > 0 (fp32 products with IEEE, for fp32 inputs)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if SOFTCAP > 0:
        t = tl.exp(-2.0 * tl.abs(s / SOFTCAP))
        s = tl.where(s < 0, -SOFTCAP, SOFTCAP) * (1.0 - t) / (1.0 + t)
    return s


@triton.jit
def softmax_update(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One tile of the online softmax: masked logits ``s`` [M, BLOCK_N] (-inf where unseen)
    and values ``v`` into the running max ``m_i``, sum ``l_i`` and output ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv
