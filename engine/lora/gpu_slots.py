"""GPU slots: up to ``max_loras`` resident adapters in preallocated LoRA row buffers.

The buffers follow engine.lora.slot_layout: one row buffer per (fused module kind, A|B), every
layer's ``lora_a[s]`` [rows, in] / ``lora_b[s]`` [N_s, rows] a view. The memory is shared by
rank (S-LoRA's unified paging, in contiguous runs): an adapter takes a block of rows as long as
its rank rounded up to a power-of-two number of 16-row pages, so a rank-8 adapter holds an
eighth of what a rank-64 one does; where blocks go, and which adapters a step may add, is
engine.lora.slot_pages' (torch-free). ``memory_slots`` sizes the buffers in
max_lora_rank-wide slots (default max_loras: every resident adapter fits at full rank, as whole
slots did). Each slot (an id, 0..max_loras-1) has its adapter's first row and rank in ``rows``
(kernels.segments.SlotRows), which the LoRA kernels read.

Writing an adapter is one copy per kind it targets from its staging buffer (scaled B,
zero-padded to its block), plus a zero-fill of the kinds an earlier occupant of those rows
wrote and it does not. On CUDA the copies run on a side stream: the step that first reads the
slot waits on that copy's event (``wait_for``), and a copy waits for the last steps that read
the slots whose rows it overwrites (``mark_used``). Registering more adapters never adds GPU
memory. With ``fold``, a kind's A rows live under each layer's base weight instead
(slot_layout.FoldedA).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from lorry.engine.errors import LoRAError
from lorry.engine.lora.extras import SlotExtras
from lorry.engine.lora.slot_layout import SlotLayout, copy_into_rows, zero_rows
from lorry.engine.lora.slot_pages import SlotPages
from lorry.engine.lora.weights import AdapterWeights
from lorry.kernels import dense_ops
from lorry.kernels.segments import SlotRows


def adapter_rank(weights: AdapterWeights) -> int:
    """The rank a slot holding ``weights`` is read to: its largest module rank (PEFT's
    rank_pattern gives modules their own; the staging buffers are zero past each one)."""
    return max((r for _, _, r, _, _ in weights.spec.modules.values()), default=0)


class GPUSlotManager(SlotPages):
    """Adapters in ``max_loras`` slots over shared row buffers: SlotPages' placement, plus the
    copies into the buffers and the slot table the kernels read."""

    def __init__(self, model, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, fold: bool = False, max_full_copies: int | None = None,
                 memory_slots: int | None = None):
        super().__init__(max_loras, max_rank, memory_slots)
        self.layout = SlotLayout(model, max_rank)
        self.buffers = self.layout.allocate(self.num_rows, dtype, device, fold)  # {kind: (A, B)}
        self.extras = SlotExtras(self.layout, max_loras, device)  # bias terms, DoRA, heads
        # each slot's first row and rank, read by the kernels (a fixed address for CUDA
        # graphs); written on the copy stream with the weights, so a step that waits for a
        # slot's copy (wait_for) reads its place too
        self.rows = SlotRows(torch.zeros(2, max_loras, dtype=torch.int32, device=device),
                             max_rank, row_align=min(self.page & -self.page, 16))
        self.dirty: dict[str, set[int]] = {k: set() for k in self.buffers}  # kind -> pages
        self.hits = self.misses = 0
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

    def has_room(self, protected: set[int], lora_id: int | None = None) -> bool:
        """Whether ``lora_id`` (None: the smallest adapter) can be written without evicting
        ``protected`` or pinned ones (under a cap on full copies: even the one with the most
        of them)."""
        need = max(self.copies_needed.values(), default=0)
        if self.max_full_copies is not None and need and \
                self.held_copies(protected | self.pinned) + need > self.max_full_copies:
            return False
        return self.block_free(protected, lora_id)

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

        ``protected`` ids (used by the running batch) are never evicted; the block is
        chosen by ``SlotPages.make_room`` (RuntimeError where running or pinned adapters
        leave none: the scheduler's planner admits no such adapter).
        """
        slot = self.slot_of.get(lora_id)
        if slot is not None:
            self.hits += 1
            self.slot_of.move_to_end(lora_id)
            return slot
        if weights.staged is None:
            raise ValueError("adapter weights have no staging buffers; load them with the "
                             "engine's slot layout (load_adapter_weights(..., layout=...))")
        self.rank_of[lora_id] = adapter_rank(weights)
        self._room_for_copies(lora_id, weights.extras.full_copies if weights.extras else 0,
                              protected)
        n = self._staged_rows(weights) // self.page
        slot, first, freed = self.make_room(lora_id, n, protected)
        self._write(slot, first, n, weights, freed)
        self.misses += 1
        self.place(lora_id, slot, first, n)
        return slot

    def _staged_rows(self, weights: AdapterWeights) -> int:
        rows = {a.shape[2] for a, _ in weights.staged.values()}
        return rows.pop() if rows else self.layout.block_rows(adapter_rank(weights))

    def _write(self, slot: int, first: int, n: int, weights: AdapterWeights,
               freed: list[int]) -> None:
        """Copy ``weights`` into pages first .. first + n and point ``slot`` at them; the copy
        waits for the last steps that read ``slot`` or the ``freed`` slots (their rows)."""
        staged = weights.staged
        row0, rows = first * self.page, n * self.page
        span = set(range(first, first + n))
        ctx = nullcontext()
        if self.cuda:
            for s in {slot, *freed}:
                ev = self.last_use.pop(s, None)
                if ev is not None:  # a step still reading the old rows finishes first
                    self.stream.wait_event(ev)
            ctx = torch.cuda.stream(self.stream)
        with torch.no_grad(), ctx:
            for kind, dirty in self.dirty.items():
                if kind not in staged and dirty & span:   # an earlier occupant's, not ours
                    for buf in self.buffers[kind]:
                        zero_rows(buf, row0, rows)
                    dirty -= span
            for kind, pair in staged.items():
                for buf, src in zip(self.buffers[kind], pair):
                    copy_into_rows(buf, row0, src)
                self.dirty[kind] |= span
                self.copies += 2
            self.extras.write(slot, weights.extras, (row0, rows))
            self.rows.table[0, slot].fill_(row0)
            self.rows.table[1, slot].fill_(adapter_rank(weights))
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.copied[slot] = ev
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
        slot = self.release(lora_id)
        if slot is None:
            return False
        for mod in self.layout.modules.values():
            mod.active_slots.discard(slot)
        self.extras.clear(slot)
        self.full_copies.pop(slot, None)
        return True

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "residents": len(self.slot_of), "capacity": self.capacity,
                "rows": self.num_rows, "rows_used": self.rows_used(),
                "pinned": sorted(self.pinned),
                "full_copies": sum(c for c, _ in self.full_copies.values()),
                "max_full_copies": self.max_full_copies, "full_copy_bytes": self.full_copy_bytes}
