"""kernels.fp8_matmul: the fp8 linears' W8A8 product, (xq @ w.T) * sx * sw."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels import fp8_matmul as fm

FP8 = torch.float8_e4m3fn


def _operands(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xq = (torch.randn(m, k, generator=g) * 100).clamp(-448, 448).to(FP8)
    w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8)
    sx = torch.rand(m, 1, generator=g) * 1e-2 + 1e-4          # per-row input scales
    sw = torch.rand(1, n, generator=g) * 1e-3 + 1e-5          # per-channel weight scales
    return xq, sx, w, sw


# rows of one tile, ragged rows and columns, K not a multiple of the K tile
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (19, 48, 96), (70, 96, 272)])
def test_fp8_matmul_is_the_scaled_product_of_its_operands(m, n, k, device):
    xq, sx, w, sw = _operands(m, n, k, seed=m)
    want = (xq.float() @ w.float().t()) * sx * sw
    got = fm.fp8_matmul(*(t.to(device) for t in (xq, sx, w, sw)), out_dtype=torch.float32)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # fp32 accumulation of exact fp8 products: equal up to the summation order (on a GPU
    # the tensor cores' partial sums of BLOCK_K products are narrower than fp32: ~3e-4 of
    # the largest output was seen at K = 272 before the kernel promoted them every BLOCK_K)
    tol = 1e-5 if device.type == "cpu" else 5e-4
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=tol * want.abs().max().item())
    bf = fm.fp8_matmul(*(t.to(device) for t in (xq, sx, w, sw)))
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float().cpu(), want, rtol=1e-2,
                               atol=1e-2 * want.abs().max().item())


def test_fp8_matmul_refuses_mismatched_operands(device):
    xq, sx, w, sw = (t.to(device) for t in _operands(4, 32, 64, seed=0))
    with pytest.raises(ValueError, match=r"xq \[M, K\] and w \[N, K\]"):
        fm.fp8_matmul(xq, sx, w[:, :32], sw)
    with pytest.raises(ValueError, match="4 row scales and 32 column scales"):
        fm.fp8_matmul(xq, sx[:2], w, sw)
    with pytest.raises(ValueError, match="float8_e4m3fn operands"):
        fm.fp8_matmul(xq.float(), sx, w, sw)
    assert fm.fp8_matmul(xq[:0], sx[:0], w, sw).shape == (0, 32)
    # scales as strided views (a column of a wider tensor) are read as the values they show
    wide = torch.cat([sx, torch.full_like(sx, 7.0)], dim=1)
    want = fm.fp8_matmul(xq, sx, w, sw, out_dtype=torch.float32)
    torch.testing.assert_close(fm.fp8_matmul(xq, wide[:, :1], w, sw, out_dtype=torch.float32),
                               want)


@pytest.mark.parametrize("m", [1, 16, 33, 64, 200, 512])
def test_config_tiles_rows_once_for_skinny_inputs_and_covers_every_sm(m):
    bm, bn, bk, warps, stages = fm.config_for(m, 4096, 4096)
    assert bm >= min(m, 64) and bk == 256 and warps >= 4 and stages >= 2
    assert fm.cdiv(4096, bn) * fm.cdiv(m, bm) >= 128       # enough programs for 132 SMs
    assert fm.config_for(m, 4096, 96)[2] == 128             # a short K: one K tile
    # a device of ~99 KiB a program (Ada): fewer stages, then a shorter K tile, until it fits
    bm, bn, bk, _, stages = fm.config_for(m, 28672, 4096, smem=99 * 1024)
    assert stages * (bm + bn) * bk + 8 * 1024 <= 99 * 1024 and stages >= 2
    assert fm.config_for(m, 4096, 4096, smem=227 * 1024) == fm.config_for(m, 4096, 4096)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_linear_with_the_triton_gemm_matches_scaled_mm_also_in_a_graph(monkeypatch):
    from lorry.engine.quant.onthefly import Fp8Linear

    g = torch.Generator().manual_seed(3)
    w = torch.randn(1024, 512, generator=g) * 0.02
    x = (torch.randn(40, 512, generator=g) * 3).bfloat16().cuda()
    m = Fp8Linear(w.cuda(), None)
    ref = m(x)                                               # torch._scaled_mm
    monkeypatch.setattr(Fp8Linear, "GEMM", "triton")
    got = m(x)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = m(x)
    x.mul_(2)
    graph.replay()
    assert torch.equal(yg, m(x))
