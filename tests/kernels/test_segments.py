"""The per-step tile table of kernels.segments against a plain Python walk over the slots."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels.segments import build_lora_meta, tile_table
from tests.kernels.cases import MIXES, token_slots


def _walk(slots: list[int], max_loras: int, rows: int) -> list[list[int]]:
    """Each slot's tokens in order, cut into tiles of `rows`; then padding tiles."""
    T = len(slots)
    table = []
    for slot in range(max_loras):
        toks = [t for t in range(T) if slots[t] == slot]
        for i in range(0, len(toks), rows):
            part = toks[i:i + rows]
            table.append([slot] + part + [-1] * (rows - len(part)))
    n_tiles = -(-T // rows) + min(T, max_loras)
    assert len(table) <= n_tiles     # the host-side bound the decode grid is sized from
    return table + [[max_loras] + [-1] * rows] * (n_tiles - len(table))


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("mix,num_tokens", [(m, t) for m in MIXES for t in (1, 7, 33)
                                            if (m, t) != ("distinct", 33)])
def test_tile_table_lists_every_slot_tokens_in_order(mix, num_tokens, rows):
    gen = torch.Generator().manual_seed(num_tokens)
    L = max(num_tokens, 3) if mix == "distinct" else 5
    slots = token_slots(mix, num_tokens, L, gen)
    meta = build_lora_meta(slots, L)
    table = tile_table(meta, rows)
    assert table.dtype == torch.int32
    assert table.tolist() == _walk(slots.tolist(), L, rows)
    # built once per step: every layer's launch gets the same tensor
    assert tile_table(meta, rows) is table


def test_tile_table_of_an_empty_step():
    meta = build_lora_meta(torch.zeros(0, dtype=torch.int32), 4)
    assert tile_table(meta, 4).shape == (0, 5)
