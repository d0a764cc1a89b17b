"""Continuous-batching scheduler: admit waiting sequences while rows and LoRA slots allow.

A step is either a prefill of newly admitted sequences or a decode of all running ones.
The distinct adapters of the running set (plus pinned ones) never exceed ``max_loras``:
sequences whose adapter does not fit wait until a running adapter's sequences finish.
"""
from __future__ import annotations

import heapq
from collections import deque

from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_loras: int, max_prefill_tokens: int = 8192):
        self.max_loras = max_loras
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # a min-heap: the lowest free row first keeps live rows packed at the bottom, so a
        # captured decode over rows 0..k-1 (engine.graphs) stays small
        self.free_rows = list(range(max_num_seqs))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def running_adapters(self) -> set[int]:
        return {s.lora_id for s in self.running if s.lora_id is not None}

    def schedule(self, pinned: set[int] = frozenset()) -> tuple[list[Sequence], bool]:
        """Return (sequences, is_prefill) for the next step."""
        admitted: list[Sequence] = []
        if self.waiting and self.free_rows:
            adapters = self.running_adapters()
            tokens = 0
            for seq in list(self.waiting):
                if not self.free_rows:
                    break
                lid = seq.lora_id
                if lid is not None and lid not in adapters \
                        and len(adapters | pinned | {lid}) > self.max_loras:
                    continue  # waits for a slot; never an error
                n = len(seq.prompt_token_ids)
                if admitted and tokens + n > self.max_prefill_tokens:
                    break
                tokens += n
                if lid is not None:
                    adapters.add(lid)
                self.waiting.remove(seq)
                seq.cache_row = heapq.heappop(self.free_rows)
                seq.status = SequenceStatus.RUNNING
                admitted.append(seq)
                self.running.append(seq)
        if admitted:
            return admitted, True
        return list(self.running), False

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's row."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self.free_rows, seq.cache_row)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
