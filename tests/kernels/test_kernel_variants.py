"""The attention kernels compile once per model, not once per step shape.

Triton compiles a kernel again for every new value of a constexpr argument and for every new
class of an integer argument it specializes (==1, a multiple of 16, other), ~1 s each on an
H100 with the engine waiting. A mixed step's decode rows carry a block table as wide as the
step's longest row, and a prompt step has as many rows as it admitted: when those reached a
constexpr or a specialized argument, a bulk run paid a compile at steps all through the run
(eleven steps of 1.0-1.8 s in a 1,000-request fp8 run on an H100, 27% of its time). Here each
launch's constexprs and specialization classes are recorded over many step shapes (the CPU
interpreter runs the attention kernels; the LoRA launchers' arguments are recorded without a
launch): one key for the attention kernels at a given split count and key tile, one key per
launch plan (the constexprs a step's size picks from the tuning tables) for the LoRA kernels.
"""
from __future__ import annotations

import pytest
import torch

from lorry.kernels import decode_attention as da
from lorry.kernels import prefill_attention as pa
from tests.kernels.cases import Launches


def _cache(blocks, kvh, D, bs, g):
    return (torch.randn(blocks * bs, kvh, D, generator=g),
            torch.randn(blocks * bs, kvh, D, generator=g))


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_compiles_once_for_every_table_width(splits, monkeypatch, device):
    # at a given split count and key tile (a few per model: num_splits, launch_for), every
    # table width: the split length is an argument, not a constexpr
    rec = Launches(da._decode_attn_kernel)
    merge = Launches(da._merge_splits_kernel)
    monkeypatch.setattr(da, "_decode_attn_kernel", rec)
    monkeypatch.setattr(da, "_merge_splits_kernel", merge)
    g = torch.Generator().manual_seed(0)
    heads, kvh, D, bs, B = 4, 2, 16, 16, 3
    kc, vc = (t.to(device) for t in _cache(400, kvh, D, bs, g))
    for width in (1, 2, 3, 16, 17, 31, 32, 48):
        tables = torch.randint(1, 400, (B, width), generator=g, dtype=torch.int32).to(device)
        pos = torch.tensor([0, width * bs // 2, width * bs - 1]).to(device)
        q = torch.randn(B, heads * D, generator=g).to(device)
        out = da.decode_attention(q, kc, vc, tables, pos, bs, splits)
        ref = da.decode_attention_ref(q.view(B, heads, D), kc, vc, tables, pos, bs)
        torch.testing.assert_close(out, ref.reshape(B, -1), atol=1e-5, rtol=1e-5)
    assert len(rec.keys) == 1, sorted(rec.keys)
    assert len(merge.keys) == (splits > 1), sorted(merge.keys)


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_attention_compiles_once_for_every_row_count_and_table_width(padded,
                                                                             monkeypatch,
                                                                             device):
    # packed queries (the engine's prompt steps) or right-padded to the longest (scoring)
    rec = Launches(pa._prefill_attn_kernel)
    monkeypatch.setattr(pa, "_prefill_attn_kernel", rec)
    g = torch.Generator().manual_seed(1)
    heads, kvh, D, bs = 4, 2, 16, 16
    kc, vc = (t.to(device) for t in _cache(400, kvh, D, bs, g))
    for rows, width in ((1, 1), (1, 16), (3, 5), (16, 2), (17, 3), (32, 2)):
        lens = [1 + (7 * r) % (width * bs) for r in range(rows)]
        S = max(lens) if padded else 0
        starts = [r * S for r in range(rows)] if padded else \
            [0] + [sum(lens[:r]) for r in range(1, rows)]
        ctx = [width * bs - n for n in lens]              # each row ends at its table's end
        tables = torch.randint(1, 400, (rows, width), generator=g, dtype=torch.int32).to(device)
        meta = torch.tensor([starts, lens, ctx], dtype=torch.int32).to(device)
        q = torch.randn(rows * S if padded else sum(lens), heads * D, generator=g).to(device)
        out = pa.prefill_attention(q, kc, vc, tables, meta, max(lens), bs, row_stride=S)
        ref = pa.prefill_attention_ref(q.view(-1, heads, D), kc, vc, tables, meta, bs, S)
        torch.testing.assert_close(out, ref.reshape(out.shape), atol=1e-5, rtol=1e-5)
    assert len(rec.keys) == 1, sorted(rec.keys)


def test_lora_kernels_compile_once_per_launch_plan_over_every_step_size(monkeypatch, device):
    # a step's tokens T choose the launch plan (tile sizes, split-K, the decode items'
    # rows), a bounded set of constexprs; the integers derived from T (work counts, tile
    # counts) must not add compiles on top of them: one key per plan
    from lorry.kernels import lora_decode, triton_lora, tuning
    from lorry.kernels.segments import SlotRows, build_lora_meta

    # the launchers at Llama-3-8B shapes over thousands of step sizes, recorded, not run
    recs = {"shrink": Launches(triton_lora.lora_shrink_kernel, run=False),
            "expand": Launches(triton_lora.lora_expand_kernel, run=False),
            "decode": Launches(lora_decode.lora_decode_kernel, run=False)}
    monkeypatch.setattr(triton_lora, "lora_shrink_kernel", recs["shrink"])
    monkeypatch.setattr(triton_lora, "lora_expand_kernel", recs["expand"])
    monkeypatch.setattr(lora_decode, "lora_decode_kernel", recs["decode"])
    tables = tuning.load("NVIDIA_H200")       # the H100/H200 tables, 132 SMs
    monkeypatch.setattr(lora_decode, "DECODE_CONFIG", tables["decode"])
    monkeypatch.setattr(lora_decode, "FOLD_CONFIG", tables["fold"])
    monkeypatch.setattr(triton_lora, "PROMPT_CONFIG", tables["prompt"])
    for m in (triton_lora, lora_decode):
        monkeypatch.setattr(m, "num_sms", lambda device: 132)
    L, rank, H, widths = 96, 64, 4096, [4096, 1024, 1024]       # Llama-3-8B's q/k/v
    rows = SlotRows(torch.zeros(2, L, dtype=torch.int32, device=device), rank, row_align=16)
    a = [torch.empty(32 * rank, H, device=device) for _ in widths]   # 32 slots' (never read)
    b = [torch.empty(n, 32 * rank, device=device) for n in widths]
    offs = [0, 4096, 5120]
    for T in [*range(1, 130), *range(130, 9000, 37)]:
        slots = (torch.arange(T, dtype=torch.int32) % min(T, L)).to(device)
        meta = build_lora_meta(slots, L, rows, T // min(T, L))
        triton_lora.add_lora(torch.empty(T, sum(widths), device=device),
                             torch.empty(T, H, device=device), a, b, meta, offs)
    assert recs["decode"].plans and recs["shrink"].plans     # both paths ran
    for name, r in recs.items():
        assert len(r.keys) == len(r.plans), (name, len(r.keys), len(r.plans))
