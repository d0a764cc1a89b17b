"""Where the resident adapters lie in the LoRA slot memory: slot ids, pages and blocks.

The row buffers (engine.lora.slot_layout) are cut into pages of ``page_rows`` rows. An adapter
takes a block of a power-of-two number of pages, enough for its rank (``block_rows``), at a
multiple of its size (a buddy layout), and one of ``max_loras`` slot ids. This module keeps
that bookkeeping, the least-recently-used order, pins, and the scheduler's planner, with no
tensors: engine.lora.gpu_slots.GPUSlotManager adds the copies, and
``benchmarks/schedule_replay.py`` replays the bulk workload's schedule with it on any machine.

Placement: a new adapter goes to a block none of whose pages a running or pinned adapter holds,
preferring a free one, else the one whose idle occupants were used least recently (evicted).
Blocks whose sizes are powers of two at multiples of their size fit whenever their sizes add
up to the memory, placed largest first; the scheduler's planner (RowPlanner) admits a new
adapter only where such a placement exists next to the running ones, and the engine places a
step's new adapters largest first, so a placement it admitted is always found.
"""
from __future__ import annotations

from collections import OrderedDict


def page_rows(rank: int) -> int:
    """Rows of one page of slot memory for slots ``rank`` wide: 16 where the width is a power
    of two of at least 16 (blocks of 16, 32, 64, ... rows then tile it), else the width."""
    return 16 if rank >= 16 and rank & (rank - 1) == 0 else rank


def block_rows(rank: int, max_rank: int) -> int:
    """Rows an adapter of ``rank`` takes: whole pages, a power-of-two number of them."""
    page = page_rows(max_rank)
    pages = -(-max(rank, 1) // page)
    return min(max_rank, page * (1 << (pages - 1).bit_length()))


class SlotPages:
    """Slot ids and blocks of pages for up to ``max_loras`` resident adapters in the memory of
    ``memory_slots`` (default max_loras) slots of ``max_rank`` rows."""

    def __init__(self, max_loras: int, max_rank: int, memory_slots: int | None = None):
        self.capacity, self.max_rank = max_loras, max_rank
        self.memory_slots = memory_slots or max_loras
        self.page = page_rows(max_rank)
        self.num_rows = self.memory_slots * max_rank
        self.pages: list[int | None] = [None] * (self.num_rows // self.page)  # page -> slot
        self.block_of: dict[int, tuple[int, int]] = {}   # slot -> (first page, pages)
        self.rank_of: dict[int, int] = {}   # lora id -> its rank (known once loaded)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU first
        self.free = list(range(max_loras - 1, -1, -1))
        self.pinned: set[int] = set()
        self.evictions = 0

    def ids(self) -> list[int]:
        """Resident adapter ids, least recently used first."""
        return list(self.slot_of)

    def lookup(self, lora_id: int) -> int | None:
        return self.slot_of.get(lora_id)

    # ---- placement ------------------------------------------------------------------------
    def pages_for(self, lora_id: int) -> int:
        """Pages the adapter's block takes (its rank not known yet: a max-rank slot's)."""
        return block_rows(self.rank_of.get(lora_id, self.max_rank), self.max_rank) // self.page

    def owners(self) -> dict[int, int]:
        """slot -> the lora id resident in it."""
        return {slot: lid for lid, slot in self.slot_of.items()}

    def blocked_pages(self, keep: set[int], owners: dict[int, int] | None = None) -> list[bool]:
        """Per page: whether an adapter of ``keep`` holds it."""
        owners = self.owners() if owners is None else owners
        return [p is not None and owners[p] in keep for p in self.pages]

    def blocks(self, n: int, blocked: list[bool]) -> list[int]:
        """First pages of the n-page blocks (at multiples of n) with no blocked page."""
        return [f for f in range(0, len(self.pages), n) if not any(blocked[f:f + n])]

    def victim(self, protected: set[int]) -> int | None:
        """The adapter a new one would evict for its slot id (None: an id is free, or none
        can be evicted)."""
        if self.free:
            return None
        return next((i for i in self.slot_of if i not in protected and i not in self.pinned), None)

    def block_free(self, protected: set[int], lora_id: int | None = None) -> bool:
        """Whether a slot id and a block for ``lora_id`` (None: the smallest) can be had
        without evicting ``protected`` or pinned adapters."""
        if not self.free and self.victim(protected) is None:
            return False
        n = 1 if lora_id is None else self.pages_for(lora_id)
        return bool(self.blocks(n, self.blocked_pages(protected | self.pinned)))

    def planner(self, held: set[int]) -> RowPlanner:
        """The admission planner of one scheduler pass, ``held`` (running and pinned) kept."""
        return RowPlanner(self, held)

    def placement_order(self, lora_ids) -> list[int]:
        """``lora_ids`` largest block first: the order the planner admits new adapters for,
        so the order a step's new adapters must be placed in."""
        return sorted(lora_ids, key=lambda i: -self.pages_for(i))

    def make_room(self, lora_id: int, n: int, protected: set[int]) -> tuple[int, int, list[int]]:
        """Evict what a new ``n``-page block for ``lora_id`` needs gone -> (its slot id, the
        block's first page, the slots evicted, whose last readers a copy must wait for)."""
        keep = protected | self.pinned
        owners = self.owners()
        blocks = self.blocks(n, self.blocked_pages(keep, owners))
        if not blocks:
            raise RuntimeError(f"no room for adapter {lora_id}'s {n * self.page} LoRA rows: "
                               f"running or pinned adapters hold every {n}-page block of "
                               f"{len(self.pages)} pages")
        recency = {lid: i for i, lid in enumerate(self.slot_of)}   # least recent first

        def cost(first: int) -> tuple:
            held = {owners[p] for p in self.pages[first:first + n] if p is not None}
            return (bool(held), max((recency[lid] for lid in held), default=-1), first)

        first = min(blocks, key=cost)
        freed = sorted({p for p in self.pages[first:first + n] if p is not None})   # slots
        for old in freed:
            self.remove(owners[old])
            self.evictions += 1
        if not self.free:
            victim = self.victim(keep)
            if victim is None:
                raise RuntimeError(f"all {self.capacity} LoRA slots are in use or pinned")
            freed.append(self.slot_of[victim])
            self.remove(victim)
            self.evictions += 1
        return self.free.pop(), first, freed

    def place(self, lora_id: int, slot: int, first: int, n: int) -> None:
        """Record ``lora_id`` in ``slot`` at pages first .. first + n (most recently used)."""
        for p in range(first, first + n):
            self.pages[p] = slot
        self.block_of[slot] = (first, n)
        self.slot_of[lora_id] = slot

    def release(self, lora_id: int) -> int | None:
        """Forget ``lora_id``'s slot and block; its slot id, or None if not resident."""
        self.pinned.discard(lora_id)
        slot = self.slot_of.pop(lora_id, None)
        if slot is None:
            return None
        first, n = self.block_of.pop(slot, (0, 0))
        for p in range(first, first + n):
            self.pages[p] = None
        self.free.append(slot)
        return slot

    def remove(self, lora_id: int) -> bool:
        return self.release(lora_id) is not None

    def rows_used(self) -> int:
        return self.page * sum(p is not None for p in self.pages)


class RowPlanner:
    """One scheduler pass's admissions against the slot memory: whether the adapters kept
    (running, pinned, admitted in the pass) and one more fit at once.

    Resident adapters stay where they are; new ones need blocks free of the kept ones',
    placed largest first (for power-of-two blocks at multiples of their size that finds a
    placement whenever one exists, and the engine places them in the same order). A pass
    only adds adapters, so a size that did not fit stays refused for the rest of it. The
    scheduler asks once per waiting sequence, so the answers are cached until the next
    ``add``: per block size for new adapters, and for a resident one the pages the new ones'
    placement takes (a resident adapter outside them fits without placing them again).
    """

    def __init__(self, gpu: SlotPages, held: set[int]):
        self.gpu = gpu
        self.owners = gpu.owners()
        self.fixed: set[int] = set()      # resident adapters kept where they are
        self.new: dict[int, int] = {}     # lora id -> pages, to be placed
        self.refused: int | None = None   # the smallest block size refused in this pass
        self._fits_size: dict[int, bool] = {}   # block size -> fits (until the next add)
        self._taken: set[int] | None = None     # pages the new ones' placement takes
        for lid in held:
            self.add(lid)

    def _place(self, fixed: set[int], new: dict[int, int]) -> set[int] | None:
        """The pages a largest-first placement of ``new`` takes next to ``fixed`` (None: no
        placement, or more adapters than slot ids)."""
        if len(fixed) + len(new) > self.gpu.capacity:
            return None
        taken: set[int] = set()
        if not new:
            return taken
        blocked = self.gpu.blocked_pages(fixed, self.owners)
        for n in sorted(new.values(), reverse=True):
            blocks = self.gpu.blocks(n, blocked)
            if not blocks:
                return None
            blocked[blocks[0]:blocks[0] + n] = [True] * n
            taken.update(range(blocks[0], blocks[0] + n))
        return taken

    def fits(self, lora_id: int) -> bool:
        if lora_id in self.fixed or lora_id in self.new:
            return True
        gpu = self.gpu
        if lora_id in gpu.slot_of:
            if len(self.fixed) + len(self.new) >= gpu.capacity:
                return False
            if self._taken is None:
                self._taken = self._place(self.fixed, self.new)
            first, n = gpu.block_of[gpu.slot_of[lora_id]]
            if self._taken is not None and self._taken.isdisjoint(range(first, first + n)):
                return True
            return self._place(self.fixed | {lora_id}, self.new) is not None
        n = gpu.pages_for(lora_id)
        if self.refused is not None and n >= self.refused:
            return False
        ok = self._fits_size.get(n)
        if ok is None:
            ok = self._fits_size[n] = self._place(self.fixed, {**self.new, lora_id: n}) \
                is not None
        if not ok:
            self.refused = n if self.refused is None else min(self.refused, n)
        return ok

    def add(self, lora_id: int) -> None:
        if lora_id in self.gpu.slot_of:
            self.fixed.add(lora_id)
        else:
            self.new[lora_id] = self.gpu.pages_for(lora_id)
        self._fits_size.clear()
        self._taken = None
