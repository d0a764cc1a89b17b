"""GPU slots: preallocated stacked LoRA A/B buffers (max_loras, padded to max_lora_rank).

Every LoRA-capable layer owns, per fused slice, A [L, R, in] and B [L, N_s, R]. Writing an
adapter into slot s copies its A and its scaled B (zero-padded to R); other slots keep theirs,
so registering more adapters never adds GPU memory.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from engine.lora.weights import AdapterWeights


class GPUSlotManager:
    """Assign adapters to ``max_loras`` slots, evicting the least recently used unpinned one."""

    def __init__(self, model, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.capacity, self.max_rank = max_loras, max_rank
        self.layers = list(model.lora_layers())
        for _, _, mod in self.layers:
            mod.lora_a = [torch.zeros(max_loras, max_rank, mod.in_features, dtype=dtype,
                                      device=device) for _ in mod.slice_names]
            mod.lora_b = [torch.zeros(max_loras, n, max_rank, dtype=dtype, device=device)
                          for n in mod.slice_sizes]
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU first
        self.free = list(range(max_loras - 1, -1, -1))
        self.pinned: set[int] = set()
        self.hits = self.misses = self.evictions = 0

    def ids(self) -> list[int]:
        """Resident adapter ids, least recently used first."""
        return list(self.slot_of)

    def lookup(self, lora_id: int) -> int | None:
        return self.slot_of.get(lora_id)

    def activate(self, lora_id: int, weights: AdapterWeights, protected: set[int]) -> int:
        """Make ``lora_id`` resident and most recently used; return its slot.

        ``protected`` ids (used by the running batch) are never evicted.
        """
        slot = self.slot_of.get(lora_id)
        if slot is not None:
            self.hits += 1
            self.slot_of.move_to_end(lora_id)
            return slot
        if self.free:
            slot = self.free.pop()
        else:
            victim = next((i for i in self.slot_of
                           if i not in protected and i not in self.pinned), None)
            if victim is None:
                raise RuntimeError(f"all {self.capacity} LoRA slots are in use or pinned")
            slot = self.slot_of.pop(victim)
            self.evictions += 1
        self._write(slot, weights)
        self.misses += 1
        self.slot_of[lora_id] = slot
        return slot

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        with torch.no_grad():
            for layer, _, mod in self.layers:
                used = False
                for s, name in enumerate(mod.slice_names):
                    mod.lora_a[s][slot].zero_()
                    mod.lora_b[s][slot].zero_()
                    ab = weights.tensors.get((layer, name))
                    if ab is None:
                        continue
                    a, b = ab                                      # a: [r, in], b: [out, r]
                    r = a.shape[0]
                    mod.lora_a[s][slot, :r].copy_(a, non_blocking=True)
                    mod.lora_b[s][slot, :, :r].copy_(b, non_blocking=True)
                    used = True
                if used:
                    mod.active_slots.add(slot)
                else:
                    mod.active_slots.discard(slot)

    def remove(self, lora_id: int) -> bool:
        self.pinned.discard(lora_id)
        slot = self.slot_of.pop(lora_id, None)
        if slot is None:
            return False
        for _, _, mod in self.layers:
            mod.active_slots.discard(slot)
        self.free.append(slot)
        return True

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "residents": len(self.slot_of), "capacity": self.capacity,
                "pinned": sorted(self.pinned)}
