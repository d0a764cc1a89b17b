"""CUDA-graph decode: one captured model step per (row-count bucket, LoRA layer set), replayed.

A captured step decodes KV cache rows 0..size-1 in row order (rows without a live sequence
compute garbage that nobody reads), so attention reads the cache as views, with no gather.
Inputs (token id, position, LoRA slot per row; the batch order) live in static device
buffers filled from one pinned host buffer with one copy; the LoRA metadata is built inside
the graph. A step is: host fill -> one H2D copy -> replay -> logits [B, V] in batch order.
"""
from __future__ import annotations

import torch

from lorry.engine.model.layers import LoRAStep
from lorry.engine.model.llama import Batch
from lorry.kernels.segments import build_lora_meta

IDS, POS, ROWS, SLOTS, ORDER = range(5)
FOLD_MAX_ROWS = 128


def size_ladder(max_num_seqs: int) -> list[int]:
    """Bucket sizes 1, 2, 4, 8, 16, then every 16, ending at ``max_num_seqs`` (as nano-vllm)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Captures lazily, on first use of a bucket; graphs share one memory pool.

    Free rows decode a dummy token at position 0 of their own row: harmless, since a row's
    next sequence is prefilled (positions 0..) before any decode reads it.
    """

    def __init__(self, model, ops, max_loras: int, max_num_seqs: int, max_len: int,
                 device: torch.device):
        self.model, self.ops, self.max_loras, self.max_len = model, ops, max_loras, max_len
        # layers with folded A slots take their shrink from the base matmul in steps of at
        # most this many rows (more rows: the extra matmul columns cost more than a shrink)
        self.fold_max_rows = FOLD_MAX_ROWS if hasattr(ops, "add_lora_folded") else 0
        self.sizes = size_ladder(max_num_seqs)
        n = self.sizes[-1]
        self.host = torch.zeros(5, n, dtype=torch.long).pin_memory()     # [5, n]
        self.host_np = self.host.numpy()
        self.host_np[ROWS] = range(n)
        self.dev = self.host.to(device)                                   # [5, n]
        self.zero_index = torch.zeros(n, dtype=torch.long, device=device)
        self.all_slots = frozenset(range(max_loras))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.lora_modules = [mod for _, _, mod in model.lora_layers()]
        self.captures = 0

    def bucket(self, rows: list[int]) -> int | None:
        """The smallest captured size covering rows 0..max(rows) (None: decode eagerly)."""
        top = max(rows) + 1
        return next((s for s in self.sizes if s >= top), None)

    def _lora_key(self, slots: list[int]) -> tuple | None:
        """Which layers run LoRA kernels, and which apply per-slot shifts/scales (adapter bias
        terms, DoRA): part of the graph key (None: no adapter this step)."""
        if self.ops is None or all(s < 0 for s in slots):
            return None
        return (tuple(bool(m.lora_a is not None and m.active_slots) for m in self.lora_modules)
                + tuple(bool(m.affine_slots) for m in self.lora_modules))

    def _forward(self, size: int, lora_key: tuple | None) -> torch.Tensor:
        d = self.dev
        lora = None
        if lora_key is not None and any(lora_key):
            lora = LoRAStep(build_lora_meta(d[SLOTS, :size], self.max_loras), self.ops,
                            self.all_slots, fold=size <= self.fold_max_rows, slot_modules=False)
        # kv_len is the whole cache: a host int cannot change between replays. The Triton
        # attention (the CUDA path) ignores it and stops at each row's position instead.
        batch = Batch(positions=d[POS, :size].view(size, 1), prefill=False, lora=lora,
                      cache_rows=d[ROWS, :size], kv_len=self.max_len, row_start=0)
        return self.model(d[IDS, :size].view(size, 1), batch, self.zero_index[:size])

    def _capture(self, size: int, lora_key: tuple | None):
        # an eager run first compiles the Triton kernels and warms cuBLAS outside the capture;
        # it writes the same keys/values the replay will write, so it is harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size, lora_key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, lora_key)                         # [size, V]
        self.pool = graph.pool()
        self.captures += 1
        return graph, logits

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], rows: list[int],
            slots: list[int]) -> torch.Tensor:
        """Decode one token for each of B sequences (in KV cache ``rows``); returns logits
        [B, V] in the given order (valid until the next run)."""
        B = len(ids)
        size = self.bucket(rows)
        h = self.host_np
        h[IDS, :size], h[POS, :size], h[SLOTS, :size] = 0, 0, -1
        h[IDS, rows], h[POS, rows], h[SLOTS, rows], h[ORDER, :B] = ids, positions, slots, rows
        self.dev.copy_(self.host, non_blocking=True)  # 5 x n longs: one small copy
        key = (size, self._lora_key(slots))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        entry[0].replay()
        if rows == list(range(B)):  # rows already in batch order: a view, no 33 MB gather
            return entry[1][:B]
        return entry[1].index_select(0, self.dev[ORDER, :B])
