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
