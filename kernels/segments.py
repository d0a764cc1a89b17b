"""Per-step LoRA batch metadata: which tokens use which adapter slot.

Built once per model step from the per-token slot ids and shared by every LoRA layer
(every q/k/v/o/gate/up/down projection of every decoder layer) in that step. Building it
uses only device-side torch ops (no host sync), so it can live inside a captured CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotRows:
    """Slot memory shared by rank: each slot's adapter is a run of rows in the row buffers.

    ``table`` [2, max_loras] int32 on the device: row 0 the first row of each slot's adapter,
    row 1 its rank (0: an empty slot). Rows past an adapter's rank, up to the next multiple of
    16, must be zero (kernels read whole 16-row groups, so that loads along the rank stay
    vectorized). ``max_rank``: the largest rank a slot can hold (the kernels' tile width);
    ``row_align``: every first row is a multiple of it (a power of two: the kernels' loads
    along the rank are vectorized to it). The owner (engine.lora.gpu_slots) changes the table
    in place, so captured graphs read the current placement.
    """

    table: torch.Tensor
    max_rank: int
    row_align: int = 1

    def __post_init__(self):
        if self.table.dim() != 2 or self.table.shape[0] != 2 or self.table.dtype != torch.int32:
            raise ValueError(f"SlotRows.table must be [2, max_loras] int32, got "
                             f"{list(self.table.shape)} {self.table.dtype}")


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
    rows : SlotRows or None
        Where each slot's adapter lies in slot memory shared by rank (None: the weights are
        per-slot stacks ``lora_a[s]`` [L, R, H], ``lora_b[s]`` [L, N_s, R]). With rows, the
        weights are row buffers ``lora_a[s]`` [rows, H] and ``lora_b[s]`` [N_s, rows] and a
        slot's adapter is rows ``base .. base + rank`` of them.
    tokens_per_slot : int or None
        The tokens with an adapter over the slots holding them (rounded down), where the
        caller knows it on the host (an eager step); None where it does not (a captured
        step), and the kernels then estimate it as T // min(T, max_loras).
    """

    token_slots: torch.Tensor
    sorted_token_ids: torch.Tensor
    slot_token_counts: torch.Tensor
    slot_token_starts: torch.Tensor
    max_loras: int
    rows: SlotRows | None = None
    tokens_per_slot: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def build_lora_meta(token_slots: torch.Tensor, max_loras: int,
                    rows: SlotRows | None = None,
                    tokens_per_slot: int | None = None) -> LoRAMeta:
    """Sort tokens by slot and count them per slot, without a host sync.

    token_slots: [T] int (slot per token, -1 = no adapter). rows, tokens_per_slot: see LoRAMeta.
    """
    if rows is not None and rows.table.shape[1] != max_loras:
        raise ValueError(f"SlotRows.table has {rows.table.shape[1]} slots, max_loras is "
                         f"{max_loras}")
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
        rows=rows,
        tokens_per_slot=tokens_per_slot,
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
