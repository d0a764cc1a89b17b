"""The engine's vectorised CPU LoRA ops equal the kernels' loop reference on adversarial mixes."""
from __future__ import annotations

import pytest
import torch

import kernels.torch_ref as ref
from engine.lora import dense_ops
from kernels.segments import build_lora_meta

MIXES = {
    "distinct": lambda T, L: torch.arange(T) % L,
    "uniform": lambda T, L: torch.full((T,), 1),
    "skewed": lambda T, L: torch.where(torch.arange(T) % 7 == 0, L - 1, 0),
    "none": lambda T, L: torch.full((T,), -1),
    "with_unadapted": lambda T, L: torch.randint(-1, L, (T,), generator=torch.Generator().manual_seed(T)),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("T", [1, 7, 133])
def test_add_lora_matches_reference(mix, T):
    g = torch.Generator().manual_seed(0)
    L, R, H, sizes = 4, 8, 32, [24, 8, 8]
    x = torch.randn(T, H, generator=g)
    a = [torch.randn(L, R, H, generator=g) for _ in sizes]
    b = [torch.randn(L, n, R, generator=g) for n in sizes]
    offsets = [0, 24, 32]
    meta = build_lora_meta(MIXES[mix](T, L), L)
    y0 = torch.randn(T, sum(sizes), generator=g)
    y_ref, y_dense = y0.clone(), y0.clone()
    ref.add_lora(y_ref, x, a, b, meta, offsets)
    dense_ops.add_lora(y_dense, x, a, b, meta, offsets)
    torch.testing.assert_close(y_dense, y_ref, atol=1e-5, rtol=1e-5)
    out = torch.zeros(len(sizes), T, R)
    dense_ops.lora_shrink(x, a, meta, out)
    y_two = y0.clone()
    dense_ops.lora_expand(out, b, meta, y_two, offsets)
    torch.testing.assert_close(y_two, y_ref, atol=1e-5, rtol=1e-5)
