"""LoRAMeta.slot_ranks: the Triton LoRA kernels read each slot only to its adapter's rank.

To show that the kernels honour the ranks (and do not merely read zeros), the rows past each
slot's rank rounded up to 16 (the kernels' reads) are filled with large values here: with the
ranks given, the output equals the loop reference over the truncated adapters; without them
it does not.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorry.kernels.backends import get_lora_ops
from lorry.kernels.segments import build_lora_meta
from tests.kernels.cases import TOLERANCE, loop_reference, make_problem, rel_error
from tests.kernels.test_triton_lora import _use_path

triton_ops = get_lora_ops("triton")
RANKS = [64, 8, 16, 33, 48]      # slot l holds an adapter of rank RANKS[l] (max rank 64)
MAX_RANK = 64
WIDTHS = [40, 24, 24]


def _ranked(p, device):
    """(the problem with its slots' ranks in the meta, the same weights with garbage past
    each slot's rank)."""
    L = p.meta.max_loras
    ranks = torch.tensor([RANKS[s % len(RANKS)] for s in range(L)], dtype=torch.int32,
                         device=device)
    ranked = dataclasses.replace(p, meta=build_lora_meta(p.slots, L, ranks))
    gen = torch.Generator().manual_seed(7)
    a_dirty, b_dirty = [], []
    for a, b in zip(p.lora_a, p.lora_b):
        a, b = a.clone(), b.clone()
        for s in range(L):
            r = -(-RANKS[s % len(RANKS)] // 16) * 16      # what the kernels read
            a[s, r:] = 100 * torch.randn(a[s, r:].shape, generator=gen).to(a)
            b[s, :, r:] = 100 * torch.randn(b[s, :, r:].shape, generator=gen).to(b)
        a_dirty.append(a)
        b_dirty.append(b)
    return ranked, a_dirty, b_dirty


@pytest.mark.parametrize("path", ["decode", "two_launch"])
@pytest.mark.parametrize("mix,num_tokens", [("skewed", 7), ("some_without", 33),
                                            ("uniform", 5)])
def test_add_lora_reads_each_slot_to_its_rank(mix, num_tokens, path, monkeypatch, device):
    _use_path(monkeypatch, path)
    p = make_problem(num_tokens=num_tokens, hidden=72, widths=WIDTHS, max_rank=MAX_RANK,
                     ranks=RANKS, mix=mix, dtype=torch.float32, device=device)
    ref = loop_reference(p)                      # the truncated adapters (zeros past ranks)
    ranked, a_dirty, b_dirty = _ranked(p, device)
    y = p.y.clone()
    triton_ops.add_lora(y, p.x, a_dirty, b_dirty, ranked.meta, p.offsets)
    assert rel_error(y, ref) < TOLERANCE[torch.float32]
    no_adapter = p.slots < 0
    assert torch.equal(y[no_adapter], p.y[no_adapter])
    # without the ranks the same weights give another answer: the ranks were what kept it
    if any(RANKS[s % len(RANKS)] <= 48 for s in p.slots.tolist() if s >= 0):
        y_all = p.y.clone()
        triton_ops.add_lora(y_all, p.x, a_dirty, b_dirty, p.meta, p.offsets)
        assert rel_error(y_all, ref) > 1.0


def test_two_launch_path_with_a_buffer_reads_each_slot_to_its_rank(device):
    p = make_problem(num_tokens=21, hidden=72, widths=WIDTHS, max_rank=MAX_RANK, ranks=RANKS,
                     mix="some_without", dtype=torch.float32, device=device)
    ranked, a_dirty, b_dirty = _ranked(p, device)
    y = p.y.clone()
    buf = torch.full((len(WIDTHS), 21, MAX_RANK), float("nan"), device=device)  # not read past
    triton_ops.add_lora(y, p.x, a_dirty, b_dirty, ranked.meta, p.offsets, buffer=buf)
    assert rel_error(y, loop_reference(p)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", ["decode", "two_launch"])
def test_expand_of_folded_products_reads_each_slot_to_its_rank(path, monkeypatch, device):
    _use_path(monkeypatch, path)
    p = make_problem(num_tokens=9, hidden=100, widths=[200, 72, 40], max_rank=MAX_RANK,
                     ranks=RANKS, mix="skewed", dtype=torch.float32, device=device)
    ranked, a_dirty, b_dirty = _ranked(p, device)
    L, N = p.meta.max_loras, 312
    w = torch.randn(N, 100, device=device) * 0.1
    ext = torch.cat([w] + [a.reshape(L * MAX_RANK, 100) for a in a_dirty])  # garbage A rows too
    out = p.x @ ext.t()
    p.y = out[:, :N].clone()
    y = out[:, :N]
    triton_ops.add_lora_folded(y, out[:, N:], b_dirty, ranked.meta, p.offsets, hidden=100)
    assert rel_error(y, loop_reference(p)) < TOLERANCE[torch.float32]


def test_slot_ranks_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"slot_ranks must be \[max_loras=4\] int32"):
        build_lora_meta(torch.zeros(3, dtype=torch.int32), 4, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        build_lora_meta(torch.zeros(3, dtype=torch.int32), 4, torch.zeros(4, dtype=torch.long))
