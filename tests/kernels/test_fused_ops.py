"""Fused add+RMSNorm, silu*up and rotary(+KV cache write) kernels against their torch code."""
from __future__ import annotations

import pytest
import torch

from lorry.engine.model.layers import RMSNorm, Rotary, apply_rotary
from lorry.kernels.fused_ops import (
    add_rmsnorm,
    add_rmsnorm_ref,
    rotary_qk_,
    rotary_qk_ref,
    silu_mul,
    silu_mul_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rounds_to_nearest(dtype, device) -> bool:
    # Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding: exact on CUDA only
    return not (device.type == "cpu" and dtype == torch.bfloat16)


def _close(a, b, dtype):
    # same roundings as the torch code: equal but for one fp32 reduction order (or exactly)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]  # a few ulps
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 96), (33, 200)])
def test_add_rmsnorm_matches_layer_code(dtype, rows, hidden, device):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    r = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    norm = RMSNorm(hidden, 1e-5).to(device=device, dtype=dtype)
    norm.weight.copy_(torch.randn(hidden, generator=g))
    # with a residual: the decoder's x + sublayer(x) then the next norm
    res = r.clone()
    out, new_res = add_rmsnorm(x, res, norm.weight, norm.eps)
    assert new_res.data_ptr() == res.data_ptr()                # updated in place
    if _rounds_to_nearest(dtype, device):
        assert torch.equal(new_res, x + r)
    _close(new_res, x + r, dtype)
    _close(out, norm(x + r), dtype)
    # without one (first layer): the residual is x itself
    out0, res0 = add_rmsnorm(x, None, norm.weight, norm.eps)
    assert res0 is x
    _close(out0, norm(x), dtype)
    ref_out, _ = add_rmsnorm_ref(x, r, norm.weight, norm.eps)
    _close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 48), (5, 136), (64, 5000)])
def test_silu_mul_matches_torch(dtype, rows, inter, device):
    g = torch.Generator().manual_seed(inter)
    gu = (3 * torch.randn(rows, 2 * inter, generator=g)).to(dtype).to(device)
    out = silu_mul(gu)
    assert out.shape == (rows, inter)
    _close(out, silu_mul_ref(gu), dtype)


class _Cfg:
    rope_theta = 10000.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 6, 24), (32, 8, 128)])
def test_rotary_qk_matches_apply_rotary(dtype, heads, kv_heads, head_dim, device):
    T, max_len = 9, 50
    g = torch.Generator().manual_seed(heads * head_dim)
    rot = Rotary(_Cfg(), head_dim, max_len).to(device)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(T, width, generator=g).to(dtype).to(device)
    pos = torch.randint(0, max_len, (T,), generator=g).to(device)
    # the torch code of the model: q and k rotated together from the per-step tables
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(T, 1, heads + kv_heads, head_dim)
    want = apply_rotary(qk.transpose(1, 2), *rot.tables(pos[:, None], dtype)).transpose(1, 2)
    got = rotary_qk_(qkv.clone(), pos, rot.cos, rot.sin, heads, kv_heads, head_dim)
    n = (heads + kv_heads) * head_dim
    _close(got[:, :n], want.reshape(T, n), dtype)
    assert torch.equal(got[:, n:], qkv[:, n:])                  # v untouched
    _close(got, rotary_qk_ref(qkv, pos, rot.cos, rot.sin, heads, kv_heads, head_dim), dtype)


def test_rotary_qk_reads_positions_and_slots_through_their_strides(device):
    # a prompt step of single-token rows from position 0 hands the kernel an expanded
    # arange: positions [T] with stride 0 (the warm-up's probes met it: the kernel read past
    # the one stored element). Here the elements after it differ, so a kernel that assumes
    # unit strides rotates by, and writes to, the wrong ones.
    heads, kv_heads, D, bs, T = 4, 2, 16, 4, 3
    g = torch.Generator().manual_seed(3)
    rot = Rotary(_Cfg(), D, 40).to(device)
    # one row repeated: the tokens share the one slot a stride-0 mapping gives them, so the
    # cache write is the same whichever program's lands last
    qkv = torch.randn(1, (heads + 2 * kv_heads) * D, generator=g).expand(T, -1).contiguous()
    qkv = qkv.to(device)
    pos_buf = torch.tensor([5, 30, 31, 32], device=device)
    slot_buf = torch.tensor([9, 1, 2, 3], device=device)
    pos, slots = pos_buf[:1].expand(T), slot_buf[:1].expand(T)
    assert pos.stride() == (0,) and slots.stride() == (0,)
    caches = [torch.zeros(6 * bs, kv_heads, D, device=device) for _ in range(4)]
    got = rotary_qk_(qkv.clone(), pos, rot.cos, rot.sin, heads, kv_heads, D, *caches[:2], slots)
    want = rotary_qk_(qkv.clone(), pos.contiguous(), rot.cos, rot.sin, heads, kv_heads, D,
                      *caches[2:], slots.contiguous())
    assert torch.equal(got, want)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0][9].abs().sum() > 0 and caches[0][1:4].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_rotary_qk_writes_exactly_the_mapped_slots(dtype, heads, kv_heads, device):
    D, bs, num_blocks = 32, 4, 9
    g = torch.Generator().manual_seed(heads * kv_heads)
    rot = Rotary(_Cfg(), D, 40).to(device)
    # a prefill chunk of sequence 0 (positions 3..8), a decode token of sequence 1 (position
    # 13) and two padding tokens (slot -1) between them; block tables shuffled over the cache
    tables = torch.randperm(num_blocks - 1, generator=g)[:7].add(1).split([3, 4])
    pos = torch.tensor([3, 4, 5, 0, 6, 7, 8, 13, 0])
    seq = torch.tensor([0, 0, 0, -1, 0, 0, 0, 1, -1])
    slots = torch.tensor([int(tables[s][p // bs]) * bs + p % bs if s >= 0 else -1
                          for s, p in zip(seq.tolist(), pos.tolist())])
    T = len(pos)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=g).to(dtype).to(device)
    # the caches are views between guard blocks, which a stray write (slot -1) would change
    kbuf = torch.randn((num_blocks + 2) * bs, kv_heads, D, generator=g).to(dtype).to(device)
    vbuf = torch.randn((num_blocks + 2) * bs, kv_heads, D, generator=g).to(dtype).to(device)
    kc0, vc0 = kbuf.clone(), vbuf.clone()
    pos, slots = pos.to(device), slots.to(device)
    out = rotary_qk_(qkv.clone(), pos, rot.cos, rot.sin, heads, kv_heads, D, kbuf[bs:-bs],
                     vbuf[bs:-bs], slots)
    # every token is rotated, cached or not
    _close(out, rotary_qk_ref(qkv, pos, rot.cos, rot.sin, heads, kv_heads, D), dtype)
    k = out[:, heads * D:(heads + kv_heads) * D].view(T, kv_heads, D)
    v = qkv[:, (heads + kv_heads) * D:].view(T, kv_heads, D)
    cached = slots >= 0
    want_k, want_v = kc0.clone(), vc0.clone()
    want_k[bs + slots[cached]] = k[cached]
    want_v[bs + slots[cached]] = v[cached]
    assert torch.equal(kbuf, want_k)                            # those slots and no other
    assert torch.equal(vbuf, want_v)


def test_rotary_qk_refuses_a_cache_of_another_layout(device):
    rot = Rotary(_Cfg(), 16, 8).to(device)
    qkv = torch.zeros(2, 4 * 16, device=device)
    pos = torch.zeros(2, dtype=torch.long, device=device)
    static = torch.zeros(2, 1, 8, 16, device=device)            # [rows, kvh, max_len, D]
    with pytest.raises(ValueError, match="caches must be"):
        rotary_qk_(qkv, pos, rot.cos, rot.sin, 2, 1, 16, static, static, pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_qk_writes_an_fp8_cache_saturated_and_rounded_as_torch(dtype, device):
    # EngineConfig.kv_cache_dtype="fp8": the rotated k and the v are stored as float8 e4m3,
    # saturating at +-448 (never NaN) and rounded to nearest as torch's conversion (torch's
    # CUDA conversion gives NaN past 448, its CPU one saturates since 2.13: clamped first)
    heads, kv_heads, D, bs = 4, 2, 32, 4
    g = torch.Generator().manual_seed(5)
    rot = Rotary(_Cfg(), D, 40).to(device)
    pos = torch.tensor([0, 3, 9, 17, 30], device=device)
    slots = torch.tensor([5, 1, 14, 8, 22], device=device)
    T = len(pos)
    # values up to ~4,000: some past e4m3's largest finite value
    qkv = (torch.randn(T, (heads + 2 * kv_heads) * D, generator=g) * 1000).to(dtype).to(device)
    kc = torch.zeros(6 * bs, kv_heads, D, dtype=torch.float8_e4m3fn, device=device)
    vc = torch.zeros_like(kc)
    out = rotary_qk_(qkv.clone(), pos, rot.cos, rot.sin, heads, kv_heads, D, kc, vc, slots)
    k = out[:, heads * D:(heads + kv_heads) * D].view(T, kv_heads, D)
    v = qkv[:, (heads + kv_heads) * D:].view(T, kv_heads, D)
    assert k.abs().max() > 448 and v.abs().max() > 448
    want_k, want_v = torch.zeros_like(kc), torch.zeros_like(vc)
    want_k[slots] = k.clamp(-448, 448).to(torch.float8_e4m3fn)
    want_v[slots] = v.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert not kc.float().isnan().any()
    assert torch.equal(kc.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), want_v.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (9, 200), (33, 1024)])
def test_quant_fp8_rows_is_the_fp8_linears_torch_code_bit_for_bit(dtype, rows, cols, device):
    # engine.quant's fp8 linears scale each input row by its absmax / 448 on CUDA here
    from lorry.engine.quant.onthefly import quantize_rows
    from lorry.kernels.fused_ops import quant_fp8_rows

    g = torch.Generator().manual_seed(rows * cols)
    # rows of magnitudes 1e-3..1e3, strided (half of wider rows)
    x = (torch.randn(rows, 2 * cols, generator=g) * 10.0 ** torch.randint(
        -3, 4, (rows, 1), generator=g)).to(dtype).to(device)[:, :cols]
    x[0] = 0.0                                               # a zero row stays zero
    q, s = quant_fp8_rows(x)
    want_q, want_s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows, 1)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert (q[0].float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 64), (7, 200), (33, 1024)])
def test_norm_and_silu_quantize_their_rows_as_quant_fp8_rows_in_the_same_pass(
        dtype, rows, width, device, monkeypatch):
    # fp8=True: the fp8 linears' inputs from the norm / silu*up pass itself, bit for bit what
    # quant_fp8_rows makes of their (unchanged) outputs
    from lorry.kernels import fused_ops
    from lorry.kernels.fused_ops import quant_fp8_rows

    g = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, width, generator=g) * 10.0 ** torch.randint(
        -2, 3, (rows, 1), generator=g)).to(dtype).to(device)
    r = torch.randn(rows, width, generator=g).to(dtype).to(device)
    w = torch.randn(width, generator=g).to(dtype).to(device)
    plain, plain_res = add_rmsnorm(x, r.clone(), w, 1e-5)
    out, res, (q, s) = add_rmsnorm(x, r.clone(), w, 1e-5, fp8=True)
    assert torch.equal(res, plain_res)
    _close(out, plain, dtype)              # one fp32 reduction, compiled in another kernel
    want_q, want_s = quant_fp8_rows(out)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows, 1)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    gu = (3 * torch.randn(rows, 2 * width, generator=g)).to(dtype).to(device)
    gu[0] = 0.0                                                  # a zero row: scale 1e-12/448
    for block in (fused_ops.SILU_BLOCK, 64):     # a row in one tile, and in several
        monkeypatch.setattr(fused_ops, "SILU_BLOCK", block)
        act, (q, s) = silu_mul(gu, fp8=True)
        _close(act, silu_mul(gu), dtype)
        want_q, want_s = quant_fp8_rows(act)
        assert torch.equal(s, want_s)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        assert (q[0].float() == 0).all()
