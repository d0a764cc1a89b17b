"""Fused elementwise ops of the decoder on CUDA (Triton), each with a torch reference.

- ``add_rmsnorm``: residual add + RMSNorm in one pass (returns the normed rows and the new
  residual, which is written in place);
- ``silu_mul``: silu(gate) * up of a fused gate/up projection;
- ``rotary_qk_``: rotary embedding of q and k inside a fused q/k/v row, in place, reading
  cos/sin at each row's position, and optionally writing k/v into a paged KV cache;
- ``quant_fp8_rows``: each row scaled by its absmax / 448 and rounded to float8 e4m3 (the
  inputs of engine.quant's fp8 linears), one pass instead of torch's six; ``add_rmsnorm`` and
  ``silu_mul`` quantize their output rows so in the same pass when asked (``fp8=True``).

Roundings follow the torch code they replace (engine.model.layers), step by step, so the
results equal it up to the order of one fp32 reduction. No host sync; graph-capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorry.kernels.launch_math import cdiv, next_pow2
from lorry.kernels.paged_tiles import to_cache

# ----------------------------------------------------------------------------- references

def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (weight * rms_norm(x + residual), x + residual)."""
    s = x if residual is None else x + residual
    normed = torch.nn.functional.rms_norm(s.float(), (s.shape[-1],), eps=eps).to(s.dtype)
    return weight * normed, s


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] -> silu(gate) * up: [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_qk_ref(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv: [T, (h + 2 kvh) D]; positions: [T]; cos/sin: [max_len, D] fp32 tables
    -> qkv with q and k rotated (rotate-half layout), as engine.model.layers.apply_rotary."""
    T, half = qkv.shape[0], head_dim // 2
    n = (heads + kv_heads) * head_dim
    qk = qkv[:, :n].view(T, heads + kv_heads, head_dim)
    c = cos[positions].to(qkv.dtype)[:, None]
    s = sin[positions].to(qkv.dtype)[:, None]
    rot = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
    out = qkv.clone()
    out[:, :n] = (qk * c + rot * s).reshape(T, n)
    return out


SILU_BLOCK = 4096   # columns of silu*up a program (or, quantizing, a tile of its row) takes

# ----------------------------------------------------------------------------- kernels

@triton.jit
def _quant_row_store(y, m, q_ptr, s_ptr, row, stride_q, cols):
    """Row ``y`` (already in the model dtype) as e4m3 over its absmax / 448, as
    quant_fp8_rows would quantize it after a store and a load."""
    yf = y.to(tl.float32)
    sc = _fp8_scale(tl.max(tl.abs(tl.where(m, yf, 0.0)), 0))
    tl.store(s_ptr + row, sc)
    tl.store(q_ptr + row * stride_q + cols, to_cache(tl.math.div_rn(yf, sc),
                                                     q_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fp8_scale(amax):
    """A row's scale from its absmax: max(amax, 1e-12) / 448, divided as IEEE does (fp32 ``/``
    compiles to an approximate division on NVIDIA GPUs)."""
    return tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, q_ptr, s_ptr, H, stride_x, stride_r,
                        stride_o, stride_q, eps, HAS_RES: tl.constexpr, QUANT: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # as torch's add
        tl.store(res_ptr + row * stride_r + cols, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=m)
    if QUANT:
        _quant_row_store(y, m, q_ptr, s_ptr, row, stride_q, cols)


@triton.jit
def _silu_mul_tile(gu_ptr, row, cols, m, inter, stride_gu, OUT_TY: tl.constexpr):
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=m, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)                       # F.silu rounds here
    return (s.to(tl.float32) * u.to(tl.float32)).to(OUT_TY)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inter
    y = _silu_mul_tile(gu_ptr, row, cols, m, inter, stride_gu, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=m)


@triton.jit
def _silu_mul_fp8_kernel(gu_ptr, out_ptr, q_ptr, s_ptr, inter, stride_gu, stride_o, stride_q,
                         BLOCK: tl.constexpr):
    # one program a row, in BLOCK-wide tiles (a 14k-wide row whole would spill registers):
    # the products and their absmax first, then the row quantized from what was stored
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < inter
        y = _silu_mul_tile(gu_ptr, row, cols, m, inter, stride_gu, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + cols, y, mask=m)
        amax = tl.maximum(amax, tl.abs(tl.where(m, y.to(tl.float32), 0.0)))
    sc = _fp8_scale(tl.max(amax, 0))
    tl.store(s_ptr + row, sc)
    tl.debug_barrier()                        # the program's stores above, seen by all of it
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < inter
        y = tl.load(out_ptr + row * stride_o + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + cols, to_cache(tl.math.div_rn(y, sc),
                                                         q_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotary_qk_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                      stride_t, stride_tab, s_cs, s_ch,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                      WRITE_CACHE: tl.constexpr):
    # one program per token: every q and k head of the row, plus the k/v cache write
    t = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = 2 * HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]                        # [BH, 1]
    cols = tl.arange(0, BLOCK_HALF)[None, :]                      # [1, BHALF]
    cm = cols < HALF
    m = (heads < HEADS + KV_HEADS) & cm
    dt = qkv_ptr.dtype.element_ty
    c1 = tl.load(cos_ptr + pos * stride_tab + cols, mask=cm, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_tab + HALF + cols, mask=cm, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_tab + cols, mask=cm, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_tab + HALF + cols, mask=cm, other=0.0).to(dt).to(tl.float32)
    base = qkv_ptr + t * stride_t + heads * D + cols
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rounding each product and the sum like the torch code
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    tl.store(base, o1, mask=m)
    tl.store(base + HALF, o2, mask=m)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:                                             # < 0: this token is not cached
            kh = heads - HEADS                                    # k head index (q rows < 0)
            km = m & (kh >= 0)
            kdst = kc_ptr + slot * s_cs + kh * s_ch + cols
            cty = kc_ptr.dtype.element_ty                         # the model's, or fp8
            tl.store(kdst, to_cache(o1, cty), mask=km)
            tl.store(kdst + HALF, to_cache(o2, cty), mask=km)
            vh = tl.arange(0, BLOCK_H)[:, None]
            vm = (vh < KV_HEADS) & cm
            vsrc = qkv_ptr + t * stride_t + (HEADS + KV_HEADS) * D + vh * D + cols
            vdst = vc_ptr + slot * s_cs + vh * s_ch + cols
            tl.store(vdst, to_cache(tl.load(vsrc, mask=vm), cty), mask=vm)
            tl.store(vdst + HALF, to_cache(tl.load(vsrc + HALF, mask=vm), cty), mask=vm)


@triton.jit
def _quant_fp8_rows_kernel(x_ptr, q_ptr, s_ptr, N, stride_x, stride_q, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < N
    _quant_row_store(tl.load(x_ptr + r * stride_x + o, mask=m, other=0.0), m, q_ptr, s_ptr, r,
                     stride_q, o)


# ----------------------------------------------------------------------------- launchers

def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float, fp8: bool = False):
    """x, residual: [T, H] -> (normed [T, H], residual). With a residual, x + residual is
    written into ``residual`` (in place) and returned; without, ``x`` is the residual.
    ``fp8``: also the normed rows quantized for an fp8 linear, (normed, residual, (q, s)) with
    (q, s) = quant_fp8_rows(normed) bit for bit, from the same pass."""
    # x: [T, H]; one program per row, the whole row in registers (H up to 16k)
    T, H = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("add_rmsnorm needs rows with unit stride in the last dimension")
    out = torch.empty_like(x)
    q, s = _fp8_rows(T, H, x.device) if fp8 else (out, out)
    if T:
        block = next_pow2(H)
        res = residual if residual is not None else x
        _add_rmsnorm_kernel[(T,)](x, res, weight, out, q, s, H, x.stride(0), res.stride(0),
                                  out.stride(0), q.stride(0), eps, HAS_RES=residual is not None,
                                  QUANT=fp8, BLOCK=block, num_warps=max(1, min(16, block // 512)))
    res = residual if residual is not None else x
    return (out, res, (q, s)) if fp8 else (out, res)


def silu_mul(gate_up: torch.Tensor, fp8: bool = False):
    """gate_up: [T, 2I] (gate then up) -> silu(gate) * up: [T, I]. ``fp8``: also its rows
    quantized for an fp8 linear, (out, (q, s)), as quant_fp8_rows(out) bit for bit."""
    T, two_i = gate_up.shape
    inter = two_i // 2
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_mul needs rows with unit stride in the last dimension")
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(SILU_BLOCK, next_pow2(inter))
    warps = max(1, min(8, block // 256))
    if not fp8:
        if T:
            _silu_mul_kernel[(T, cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0),
                                                      out.stride(0), BLOCK=block,
                                                      num_warps=warps)
        return out
    q, s = _fp8_rows(T, inter, gate_up.device)
    if T:   # quantizing takes the row's absmax: one program a row
        _silu_mul_fp8_kernel[(T,)](gate_up, out, q, s, inter, gate_up.stride(0), out.stride(0),
                                   q.stride(0), BLOCK=block, num_warps=warps)
    return out, (q, s)


def _fp8_rows(T: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (e4m3 [T, N], fp32 scales [T, 1]) for quantized rows."""
    return (torch.empty(T, N, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(T, 1, dtype=torch.float32, device=device))


def rotary_qk_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
               k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
               slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k of qkv [T, (h + 2 kvh) D] in place at ``positions`` [T] (cos/sin:
    [max_len, D] tables). With paged caches ([num_slots, kvh, D]) and ``slot_mapping`` [T],
    the rotated k and the v of token t also go to slot ``slot_mapping[t]``; a negative slot
    writes nothing (the token is rotated all the same)."""
    T = qkv.shape[0]
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rotary_qk_ needs unit last strides and cos/sin tables of one layout")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    write = k_cache is not None
    if write and (v_cache is None or slot_mapping is None or k_cache.stride() != v_cache.stride()
                  or k_cache.stride(-1) != 1):
        raise ValueError("rotary_qk_ cache write needs k_cache, v_cache (one layout) and "
                         "slot_mapping")
    if write and (k_cache.shape[1:] != (kv_heads, head_dim) or k_cache.shape != v_cache.shape):
        raise ValueError(f"caches must be [num_slots, {kv_heads}, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if T:
        # one element a token: an expanded arange (single-token rows from position 0) has
        # stride 0, which the kernel's unit-stride loads would read past
        positions = positions.contiguous()
        slot_mapping = slot_mapping.contiguous() if write else None
        kc = k_cache if write else qkv
        vc = v_cache if write else qkv
        st = k_cache.stride() if write else (0, 0)
        _rotary_qk_kernel[(T,)](
            qkv, positions, cos, sin, slot_mapping if write else positions, kc, vc,
            qkv.stride(0), cos.stride(0), st[0], st[1],
            HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2,
            BLOCK_H=next_pow2(heads + kv_heads),
            BLOCK_HALF=next_pow2(head_dim // 2), WRITE_CACHE=write, num_warps=4)
    return qkv


def quant_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] (unit last stride) -> (e4m3 [T, N], fp32 scales [T, 1]): row r is x[r] / s[r]
    with s[r] its absmax / 448 (at least 1e-12 / 448), as engine.quant.onthefly's torch code
    bit for bit (IEEE division, the KV cache write's rounding); one program per row."""
    T, N = x.shape
    if x.stride(-1) != 1:
        raise ValueError("quant_fp8_rows needs rows with unit stride in the last dimension")
    q = torch.empty(T, N, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(T, 1, dtype=torch.float32, device=x.device)
    if T:
        block = next_pow2(N)
        _quant_fp8_rows_kernel[(T,)](x, q, s, N, x.stride(0), q.stride(0), BLOCK=block,
                                     num_warps=max(1, min(16, block // 512)))
    return q, s
