"""Per-step LoRA batch metadata: which tokens use which adapter slot.

Built once per model step from the per-token slot ids and shared by every LoRA layer
(every q/k/v/o/gate/up/down projection of every decoder layer) in that step. Building it
uses only device-side torch ops (no host sync), so it can live inside a captured CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAMeta:
    """Token -> adapter slot mapping for one step.

    Attributes
    ----------
    token_slots : [T] int32
        GPU slot of each token's adapter, -1 for tokens without adapter.
    sorted_token_ids : [T] int32
        Token indices ordered by slot (stable), tokens without adapter last.
    slot_token_counts : [max_loras] int32
        Number of tokens that use each slot.
    slot_token_starts : [max_loras] int32
        Offset of each slot's first token in ``sorted_token_ids``.
    max_loras : int
        Number of GPU slots (the grid's adapter axis; a host constant).
    """

    token_slots: torch.Tensor
    sorted_token_ids: torch.Tensor
    slot_token_counts: torch.Tensor
    slot_token_starts: torch.Tensor
    max_loras: int

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def build_lora_meta(token_slots: torch.Tensor, max_loras: int) -> LoRAMeta:
    """Sort tokens by slot and count them per slot, without a host sync.

    token_slots: [T] int (slot per token, -1 = no adapter).
    """
    slots = token_slots.to(torch.int32)
    # Tokens without adapter sort last: map -1 to max_loras for the sort key.
    key = torch.where(slots < 0, torch.full_like(slots, max_loras), slots)
    sorted_ids = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(max_loras + 1, dtype=torch.int32, device=slots.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return LoRAMeta(
        token_slots=slots,
        sorted_token_ids=sorted_ids,
        slot_token_counts=counts[:max_loras].contiguous(),
        slot_token_starts=starts[:max_loras].contiguous(),
        max_loras=max_loras,
    )


def tile_table(meta: LoRAMeta, rows: int) -> torch.Tensor:
    """Tiles of up to ``rows`` tokens of one slot, for kernels that take one tile a program.

    Returns [n_tiles, rows + 1] int32 with n_tiles = ceil(T / rows) + min(T, max_loras) (a
    bound from host constants, so a launch over it can be captured in a CUDA graph): column 0
    is the tile's slot (max_loras past the last tile), columns 1.. its token ids (-1 where the
    tile has fewer). One load of a row gives a program its slot and tokens, where walking
    the per-slot counts takes three dependent loads. Device-side ops only (no host sync);
    cached on the meta, which is built once per step and not changed afterwards.
    """
    cache = meta.__dict__.setdefault("_tile_tables", {})
    table = cache.get(rows)
    if table is not None:
        return table
    T, L = meta.num_tokens, meta.max_loras
    n_tiles = -(-T // rows) + min(T, L)
    dev = meta.slot_token_counts.device
    counts = meta.slot_token_counts.long()
    tiles = (counts + rows - 1) // rows
    tile_end = torch.cumsum(tiles, 0)
    m = torch.arange(n_tiles, device=dev)
    slot = torch.searchsorted(tile_end, m, right=True)           # L past the last tile
    s = slot.clamp(max=L - 1)
    r = ((m - (tile_end - tiles)[s]) * rows)[:, None] + torch.arange(rows, device=dev)
    ok = (slot < L)[:, None] & (r < counts[s][:, None])
    pos = (meta.slot_token_starts.long()[s][:, None] + r).clamp(max=max(T - 1, 0))
    toks = torch.where(ok, meta.sorted_token_ids.long()[pos] if T else pos, -1)
    table = cache[rows] = torch.cat([slot[:, None], toks], 1).to(torch.int32).contiguous()
    return table
