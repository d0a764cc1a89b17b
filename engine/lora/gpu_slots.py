"""GPU slots: preallocated stacked LoRA A/B buffers (max_loras, padded to max_lora_rank).

The buffers follow engine.lora.slot_layout: one buffer per (fused module kind, A|B), slot-major,
with every layer's ``lora_a[s]`` [L, R, in] / ``lora_b[s]`` [L, N_s, R] a strided view. Writing
an adapter into slot s is one copy per kind it targets from its staging buffer (scaled B,
zero-padded to R), plus a zero-fill of the kinds the previous occupant wrote and it does not.
On CUDA the copies run on a side stream: the step that first reads the slot waits on that
copy's event (``wait_for``), and a copy waits for the last step that read the slot it
overwrites (``mark_used``). Registering more adapters never adds GPU memory. With ``fold``,
a kind's A slots live under each layer's base weight instead (slot_layout.FoldedA).

Full per-adapter matrices (a trained lm_head / embed_tokens, modules_to_save) are the one
exception: a slot holds its adapter's copies, at most ``max_full_copies`` of them over all slots
(None: no limit); ``activate`` evicts idle holders of copies to make room.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch

from lorry.engine.errors import LoRAError
from lorry.engine.lora.extras import SlotExtras
from lorry.engine.lora.slot_layout import SlotLayout, copy_into_slot, zero_slot
from lorry.engine.lora.weights import AdapterWeights
from lorry.kernels import dense_ops


class GPUSlotManager:
    """Assign adapters to ``max_loras`` slots, evicting the least recently used unpinned one."""

    def __init__(self, model, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, fold: bool = False, max_full_copies: int | None = None):
        self.capacity, self.max_rank = max_loras, max_rank
        self.layout = SlotLayout(model, max_rank)
        self.buffers = self.layout.allocate(max_loras, dtype, device, fold)  # {kind: (A, B)}
        self.extras = SlotExtras(self.layout, max_loras, device)  # bias terms, DoRA, heads
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU first
        self.free = list(range(max_loras - 1, -1, -1))
        self.pinned: set[int] = set()
        self.hits = self.misses = self.evictions = 0
        self.written: dict[int, set[str]] = {}   # slot -> kinds holding non-zero data
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: dict[int, torch.cuda.Event] = {}   # slot -> its copy, not yet waited on
        self.last_use: dict[int, torch.cuda.Event] = {}  # slot -> end of the last step reading it
        self.copies = 0
        self.max_full_copies = max_full_copies
        self.full_copies: dict[int, tuple[int, int]] = {}  # slot -> (copies, their bytes)
        self.copies_needed: dict[int, int] = {}  # lora id -> its full copies (set at its load)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ab in self.buffers.values() for t in ab)

    def ids(self) -> list[int]:
        """Resident adapter ids, least recently used first."""
        return list(self.slot_of)

    def lookup(self, lora_id: int) -> int | None:
        return self.slot_of.get(lora_id)

    def victim(self, protected: set[int]) -> int | None:
        """The adapter a new one would evict (None: a slot is free, or none can be evicted)."""
        if self.free:
            return None
        return next((i for i in self.slot_of if i not in protected and i not in self.pinned), None)

    def has_room(self, protected: set[int]) -> bool:
        """Whether any loaded adapter can be written without evicting ``protected`` or pinned
        ones (under a cap on full copies: even the one with the most of them)."""
        need = max(self.copies_needed.values(), default=0)
        if self.max_full_copies is not None and need and \
                self.held_copies(protected | self.pinned) + need > self.max_full_copies:
            return False
        return bool(self.free) or self.victim(protected) is not None

    def copies_of(self, lora_id: int) -> int:
        slot = self.slot_of.get(lora_id)
        return 0 if slot is None else self.full_copies.get(slot, (0, 0))[0]

    def held_copies(self, ids) -> int:
        """Full copies held by the slots of the resident adapters among ``ids``."""
        return sum(self.copies_of(i) for i in ids)

    @property
    def full_copy_bytes(self) -> int:
        return sum(b for _, b in self.full_copies.values())

    def _room_for_copies(self, lora_id: int, need: int, protected: set[int]) -> None:
        """Evict idle holders of full copies (least recently used first) until ``need`` more
        fit under max_full_copies; raise LoRAError when running or pinned adapters hold them."""
        cap = self.max_full_copies
        if cap is None or not need:
            return
        while sum(c for c, _ in self.full_copies.values()) + need > cap:
            victim = next((i for i in self.slot_of if self.copies_of(i) and i not in protected
                           and i not in self.pinned), None)
            if victim is None:
                held = sum(c for c, _ in self.full_copies.values())
                raise LoRAError(
                    f"adapter {lora_id} cannot be put in a GPU slot: it has {need} full module "
                    f"cop{'ies' if need > 1 else 'y'} (a trained lm_head/embed_tokens) and {held}"
                    f" of max_full_module_copies={cap} (LORRY_MAX_FULL_MODULE_COPIES) are held by"
                    " running or pinned adapters; raise the limit or retry when they finish")
            self.remove(victim)
            self.evictions += 1

    def activate(self, lora_id: int, weights: AdapterWeights, protected: set[int]) -> int:
        """Make ``lora_id`` resident and most recently used; return its slot.

        ``protected`` ids (used by the running batch) are never evicted.
        """
        slot = self.slot_of.get(lora_id)
        if slot is not None:
            self.hits += 1
            self.slot_of.move_to_end(lora_id)
            return slot
        self._room_for_copies(lora_id, weights.extras.full_copies if weights.extras else 0,
                              protected)
        if self.free:
            slot = self.free.pop()
        else:
            victim = self.victim(protected)
            if victim is None:
                raise RuntimeError(f"all {self.capacity} LoRA slots are in use or pinned")
            slot = self.slot_of.pop(victim)
            self.evictions += 1
        self._write(slot, weights)
        self.misses += 1
        self.slot_of[lora_id] = slot
        return slot

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        staged = weights.staged
        if staged is None:
            raise ValueError("adapter weights have no staging buffers; load them with the "
                             "engine's slot layout (load_adapter_weights(..., layout=...))")
        stale = self.written.get(slot, set()) - staged.keys()
        ctx = nullcontext()
        if self.cuda:
            ev = self.last_use.pop(slot, None)
            if ev is not None:  # a step still reading the old occupant finishes first
                self.stream.wait_event(ev)
            ctx = torch.cuda.stream(self.stream)
        with torch.no_grad(), ctx:
            for kind in stale:
                for buf in self.buffers[kind]:
                    zero_slot(buf, slot)
            for kind, pair in staged.items():
                for buf, src in zip(self.buffers[kind], pair):
                    copy_into_slot(buf, slot, src)
                self.copies += 2
            self.extras.write(slot, weights.extras)
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.copied[slot] = ev
        self.written[slot] = set(staged)
        if weights.extras and weights.extras.full_copies:
            self.full_copies[slot] = (weights.extras.full_copies, weights.extras.full_copy_bytes)
        else:
            self.full_copies.pop(slot, None)
        self._invalidate_packs()
        used = {(self.layout.slice_of[m][0], layer) for layer, m in weights.tensors}
        for key, mod in self.layout.modules.items():
            if key in used:
                mod.active_slots.add(slot)
            else:
                mod.active_slots.discard(slot)

    def _invalidate_packs(self) -> None:
        # the torch ops keep packed copies of each layer's slots (lorry.kernels.dense_ops)
        for mod in self.layout.modules.values():
            dense_ops.invalidate(mod.lora_a)

    def wait_for(self, slots) -> None:
        """Order the current stream after the pending copies into ``slots`` (CUDA; else no-op)."""
        if not self.copied:
            return
        for s in set(slots):
            ev = self.copied.pop(s, None)
            if ev is not None:
                torch.cuda.current_stream().wait_event(ev)

    def mark_used(self, slots) -> None:
        """Record that the step just enqueued reads ``slots`` (a later overwrite waits for it)."""
        used = {s for s in slots if s >= 0}
        if not self.cuda or not used:
            return
        ev = torch.cuda.Event()
        ev.record()
        for s in used:
            self.last_use[s] = ev

    def remove(self, lora_id: int) -> bool:
        self.pinned.discard(lora_id)
        slot = self.slot_of.pop(lora_id, None)
        if slot is None:
            return False
        for mod in self.layout.modules.values():
            mod.active_slots.discard(slot)
        self.extras.clear(slot)
        self.full_copies.pop(slot, None)
        self.free.append(slot)
        return True

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "residents": len(self.slot_of), "capacity": self.capacity,
                "pinned": sorted(self.pinned),
                "full_copies": sum(c for c, _ in self.full_copies.values()),
                "max_full_copies": self.max_full_copies, "full_copy_bytes": self.full_copy_bytes}
