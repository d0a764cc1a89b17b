"""Continuous-batching scheduler: admit waiting sequences while rows and LoRA slots allow.

A step is either a prefill step (prompt chunks of at most ``max_num_batched_tokens`` tokens in
all, so a long prompt is split over several steps) or a decode step of every running sequence
whose prompt is in the cache. While sequences decode, prefill and decode steps alternate, so a
long prompt delays each decode step by at most one chunk's step.
The distinct adapters of the running set (plus pinned ones) never exceed ``max_loras``:
sequences whose adapter does not fit wait until a running adapter's sequences finish. Aging:
once later sequences have overtaken such a waiter ``max_bypass`` times, nothing behind it is
admitted until it is, so the running adapters drain and it gets a slot (not while pinned
adapters alone fill every slot: it waits for an unpin and the others go on).
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lorry.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """What the next model step runs."""

    seqs: list[Sequence]
    prefill: bool
    chunks: list[int] = field(default_factory=list)   # prefill: prompt tokens per sequence


class Scheduler:
    def __init__(self, max_num_seqs: int, max_loras: int, max_num_batched_tokens: int = 2048,
                 max_bypass: int = 16):
        self.max_loras = max_loras
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_bypass = max_bypass
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # a min-heap: the lowest free row first keeps live rows packed at the bottom, so a
        # captured decode over rows 0..k-1 (engine.graphs) stays small
        self.free_rows = list(range(max_num_seqs))
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def running_adapters(self) -> set[int]:
        return {s.lora_id for s in self.running if s.lora_id is not None}

    def schedule(self, pinned: set[int] = frozenset(),
                 ready: Callable[[Sequence], bool] | None = None) -> ScheduledStep:
        """The next step. ``ready(seq)``: its adapter can be used now (not still loading)."""
        decoding = [s for s in self.running if not s.prefilling]
        if decoding and self._last_was_prefill:
            self._last_was_prefill = False
            return ScheduledStep(decoding, False)
        budget = self.max_num_batched_tokens
        seqs, chunks = [], []
        for s in self.running:  # prompts already being prefilled go on first
            if s.prefilling and budget > 0:
                n = min(len(s.prompt_token_ids) - s.num_computed_tokens, budget)
                seqs.append(s)
                chunks.append(n)
                budget -= n
        for s in self._admit(pinned, ready, budget):
            n = min(len(s.prompt_token_ids), budget)
            seqs.append(s)
            chunks.append(n)
            budget -= n
        if seqs:
            self._last_was_prefill = True
            return ScheduledStep(seqs, True, chunks)
        self._last_was_prefill = False
        return ScheduledStep(decoding, False)

    def _admit(self, pinned, ready, budget: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        adapters = self.running_adapters()
        passed_over: list[Sequence] = []   # waiting for an adapter slot, overtaken by later ones
        for seq in list(self.waiting):
            if not self.free_rows or budget <= 0:
                break
            lid = seq.lora_id
            if lid is not None and lid not in adapters \
                    and len(adapters | pinned | {lid}) > self.max_loras:
                # aged: admit nobody behind it until it gets a slot -- unless pins alone
                # leave it no slot (then holding the others back would stall everyone)
                if seq.bypassed >= self.max_bypass and len(pinned | {lid}) <= self.max_loras:
                    break
                passed_over.append(seq)
                continue  # waits for a slot; never an error
            # asked only once it fits: waiters that cannot run yet start no loads (with many
            # distinct adapters waiting, their loads would evict each other from the CPU cache)
            if ready is not None and not ready(seq):
                continue  # its adapter is still loading: others go on meanwhile
            budget -= min(len(seq.prompt_token_ids), budget)
            if lid is not None:
                adapters.add(lid)
            self.waiting.remove(seq)
            seq.cache_row = heapq.heappop(self.free_rows)
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            self.running.append(seq)
            for w in passed_over:
                w.bypassed += 1
        return admitted

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's row."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self.free_rows, seq.cache_row)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
