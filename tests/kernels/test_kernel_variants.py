"""The attention kernels compile once per model, not once per step shape.

Triton compiles a kernel again for every new value of a constexpr argument and for every new
class of an integer argument it specializes (==1, a multiple of 16, other), ~1 s each on an
H100 with the engine waiting. A mixed step's decode rows carry a block table as wide as the
step's longest row, and a prompt step has as many rows as it admitted: when those reached a
constexpr or a specialized argument, a bulk run paid a compile at steps all through the run
(eleven steps of 1.2-1.8 s in a 1,000-request fp8 run on an H100, 27% of its time). Here each
launch's constexprs and specialization classes are recorded over many step shapes (the CPU
interpreter runs the kernels) and must be one set.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from lorry.kernels import decode_attention as da
from lorry.kernels import prefill_attention as pa


class Launches:
    """Stands in for a Triton kernel: records each launch's compile key, then launches."""

    def __init__(self, kernel, unspecialized):
        self.kernel, self.keys = kernel, set()
        fn = getattr(kernel, "fn", kernel)
        self.names = list(inspect.signature(fn).parameters)
        self.unspecialized = set(unspecialized)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            ints = tuple((name, 1 if a == 1 else 16 if a % 16 == 0 else 0)
                         for name, a in zip(self.names, args)
                         if isinstance(a, int) and not isinstance(a, bool)
                         and name not in self.unspecialized)
            self.keys.add((ints, tuple(sorted(kw.items()))))
            return self.kernel[grid](*args, **kw)
        return launch


def _cache(blocks, kvh, D, bs, g):
    return (torch.randn(blocks * bs, kvh, D, generator=g),
            torch.randn(blocks * bs, kvh, D, generator=g))


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_compiles_once_for_every_table_width(splits, monkeypatch):
    rec = Launches(da._decode_attn_kernel, getattr(da, "UNSPECIALIZED", ()))
    monkeypatch.setattr(da, "_decode_attn_kernel", rec)
    g = torch.Generator().manual_seed(0)
    heads, kvh, D, bs, B = 4, 2, 16, 16, 3
    kc, vc = _cache(400, kvh, D, bs, g)
    for width in (1, 2, 3, 16, 17, 31, 32, 48):
        tables = torch.randint(1, 400, (B, width), generator=g, dtype=torch.int32)
        pos = torch.tensor([0, width * bs // 2, width * bs - 1])
        q = torch.randn(B, heads * D, generator=g)
        out = da.decode_attention(q, kc, vc, tables, pos, bs, splits)
        ref = da.decode_attention_ref(q.view(B, heads, D), kc, vc, tables, pos, bs)
        torch.testing.assert_close(out, ref.reshape(B, -1), atol=1e-5, rtol=1e-5)
    assert len(rec.keys) == 1, sorted(rec.keys)


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_attention_compiles_once_for_every_row_count_and_table_width(padded,
                                                                             monkeypatch):
    # packed queries (the engine's prompt steps) or right-padded to the longest (scoring)
    rec = Launches(pa._prefill_attn_kernel, getattr(pa, "UNSPECIALIZED", ()))
    monkeypatch.setattr(pa, "_prefill_attn_kernel", rec)
    g = torch.Generator().manual_seed(1)
    heads, kvh, D, bs = 4, 2, 16, 16
    kc, vc = _cache(400, kvh, D, bs, g)
    for rows, width in ((1, 1), (1, 16), (3, 5), (16, 2), (17, 3), (32, 2)):
        lens = [1 + (7 * r) % (width * bs) for r in range(rows)]
        S = max(lens) if padded else 0
        starts = [r * S for r in range(rows)] if padded else \
            [0] + [sum(lens[:r]) for r in range(1, rows)]
        ctx = [width * bs - n for n in lens]              # each row ends at its table's end
        tables = torch.randint(1, 400, (rows, width), generator=g, dtype=torch.int32)
        meta = torch.tensor([starts, lens, ctx], dtype=torch.int32)
        q = torch.randn(rows * S if padded else sum(lens), heads * D, generator=g)
        out = pa.prefill_attention(q, kc, vc, tables, meta, max(lens), bs, row_stride=S)
        ref = pa.prefill_attention_ref(q.view(-1, heads, D), kc, vc, tables, meta, bs, S)
        torch.testing.assert_close(out, ref.reshape(out.shape), atol=1e-5, rtol=1e-5)
    assert len(rec.keys) == 1, sorted(rec.keys)
