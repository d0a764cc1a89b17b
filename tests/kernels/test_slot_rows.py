"""Slot memory shared by rank (LoRAMeta.rows): every backend reads each slot's adapter from its
own rows of one row buffer, never its neighbours', and matches the per-slot stacks."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels.backends import get_lora_ops
from lorry.kernels.segments import SlotRows, build_lora_meta
from tests.kernels.cases import TOLERANCE, loop_reference, make_problem, rel_error
from tests.kernels.test_triton_lora import _use_path

WIDTHS = [40, 24, 24]
R = 32


def _rows_of(p, ranks, gen, spare=24):
    """The problem's per-slot stacks as row buffers: slot l's adapter in a run of rows as long
    as its rank rounded up to 16, the runs side by side in a shuffled order, and rows that no
    slot owns full of noise (a kernel reading past a rank would pick it or a neighbour up)."""
    L = p.meta.max_loras
    order = torch.randperm(L, generator=gen).tolist()
    base, pos = {}, 0
    for slot in order:
        base[slot] = pos
        pos += -(-ranks[slot % len(ranks)] // 16) * 16
    rows = pos + spare
    owned = torch.zeros(rows, dtype=torch.bool)
    a_rows, b_rows = [], []
    for a, b in zip(p.lora_a, p.lora_b):
        ar = torch.randn(rows, a.shape[2], generator=gen).to(a.dtype)
        br = torch.randn(b.shape[1], rows, generator=gen).to(b.dtype)
        for slot in range(L):
            r16 = -(-ranks[slot % len(ranks)] // 16) * 16
            s0 = base[slot]
            ar[s0:s0 + r16] = a[slot, :r16].cpu()      # zero past the rank (make_problem)
            br[:, s0:s0 + r16] = b[slot, :, :r16].cpu()
            owned[s0:s0 + r16] = True
        a_rows.append(ar.to(a.device))
        b_rows.append(br.to(b.device))
    table = torch.tensor([[base[s] for s in range(L)],
                          [ranks[s % len(ranks)] for s in range(L)]], dtype=torch.int32)
    meta = build_lora_meta(p.slots, L, SlotRows(table.to(p.x.device), R, row_align=16))
    assert not owned[-spare:].any()
    return a_rows, b_rows, meta


def _problem(mix, num_tokens, device, dtype=torch.float32, ranks=(32, 8, 16, 1, 24)):
    p = make_problem(num_tokens=num_tokens, hidden=72, widths=WIDTHS, max_rank=R,
                     ranks=list(ranks), mix=mix, dtype=dtype, device=device)
    return p, _rows_of(p, list(ranks), torch.Generator().manual_seed(1))


def _check(p, y):
    assert rel_error(y, loop_reference(p)) < TOLERANCE[p.x.dtype]
    no_adapter = p.slots < 0
    assert torch.equal(y[no_adapter], p.y[no_adapter])


CASES = [("distinct", 5), ("skewed", 33), ("some_without", 9), ("uniform", 7),
         ("all_without", 3)]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("mix,num_tokens", CASES)
def test_torch_backends_read_each_slot_to_its_rank(backend, mix, num_tokens):
    p, (a_rows, b_rows, meta) = _problem(mix, num_tokens, torch.device("cpu"))
    ops = get_lora_ops(backend)
    y = p.y.clone()
    ops.add_lora(y, p.x, a_rows, b_rows, meta, p.offsets)
    _check(p, y)
    # the shrink and the expand alone: products zero past each slot's rank
    inter = torch.zeros(len(WIDTHS), num_tokens, R)
    ops.lora_shrink(p.x, a_rows, meta, inter)
    ref = torch.zeros_like(inter)
    get_lora_ops("reference").lora_shrink(p.x, p.lora_a, p.meta, ref)
    assert rel_error(inter, ref) < 1e-5 or not ref.any()
    y2 = p.y.clone()
    ops.lora_expand(inter, b_rows, meta, y2, p.offsets)
    _check(p, y2)


@pytest.mark.parametrize("path", ["decode", "two_launch"])
@pytest.mark.parametrize("mix,num_tokens", CASES)
def test_triton_reads_each_slot_to_its_rank(path, mix, num_tokens, monkeypatch, device):
    _use_path(monkeypatch, path)
    p, (a_rows, b_rows, meta) = _problem(mix, num_tokens, device)
    y = p.y.clone()
    get_lora_ops("triton").add_lora(y, p.x, a_rows, b_rows, meta, p.offsets)
    _check(p, y)


@pytest.mark.parametrize("path", ["decode", "two_launch"])
@pytest.mark.parametrize("mix,num_tokens", [("distinct", 5), ("skewed", 33),
                                            ("some_without", 9)])
def test_triton_folded_products_over_row_buffers(path, mix, num_tokens, monkeypatch, device):
    # W with every slice's A row buffer below it: one matmul gives the base output and every
    # row's product; add_lora_folded expands each token's adapter rows into the base part
    _use_path(monkeypatch, path)
    p, (a_rows, b_rows, meta) = _problem(mix, num_tokens, device)
    N = sum(WIDTHS)
    w = torch.randn(N, 72, device=device) * 0.1
    out = p.x @ torch.cat([w] + a_rows).t()                       # [T, N + S*rows]
    p.y = out[:, :N].clone()
    y = out[:, :N]
    get_lora_ops("triton").add_lora_folded(y, out[:, N:], b_rows, meta, p.offsets, hidden=72)
    _check(p, y)


def test_a_table_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[2, max_loras\] int32"):
        SlotRows(torch.zeros(3, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="has 4 slots, max_loras is 3"):
        build_lora_meta(torch.zeros(2, dtype=torch.int32), 3,
                        SlotRows(torch.zeros(2, 4, dtype=torch.int32), 16))
