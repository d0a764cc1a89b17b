"""CUDA-graph decode: one captured model step per (batch-size bucket, LoRA layer set), replayed.

Inputs live in static device buffers (token id, position, KV cache row, LoRA slot per row),
filled from one pinned host buffer with one copy per step. The LoRA metadata is built inside
the graph, so a step is: host fill -> one H2D copy -> replay -> logits [B, V].
"""
from __future__ import annotations

import torch

from engine.model.layers import LoRAStep
from engine.model.llama import Batch
from kernels.segments import build_lora_meta

IDS, POS, ROWS, SLOTS = range(4)


def size_ladder(max_num_seqs: int) -> list[int]:
    """Bucket sizes 1, 2, 4, 8, 16, then every 16, ending at ``max_num_seqs`` (as nano-vllm)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Captures lazily, on first use of a bucket; graphs share one memory pool.

    ``pad_row`` is a scratch KV cache row (the model allocates ``max_num_seqs + 1`` rows): padded
    batch entries write their keys there, never into a live sequence's row.
    """

    def __init__(self, model, ops, max_loras: int, max_num_seqs: int, max_len: int,
                 device: torch.device):
        self.model, self.ops, self.max_loras, self.max_len = model, ops, max_loras, max_len
        self.sizes = size_ladder(max_num_seqs)
        self.pad_row = max_num_seqs
        n = self.sizes[-1]
        self.host = torch.zeros(4, n, dtype=torch.long).pin_memory()     # [4, n]
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(4, n, dtype=torch.long, device=device)     # [4, n]
        self.zero_index = torch.zeros(n, dtype=torch.long, device=device)
        self.all_slots = frozenset(range(max_loras))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.lora_modules = [mod for _, _, mod in model.lora_layers()]
        self.captures = 0

    def bucket(self, batch_size: int) -> int | None:
        return next((s for s in self.sizes if s >= batch_size), None)

    def _lora_key(self, slots: list[int]) -> tuple | None:
        """Which layers run LoRA kernels: part of the graph key (None: no adapter this step)."""
        if self.ops is None or all(s < 0 for s in slots):
            return None
        return tuple(bool(m.lora_a is not None and m.active_slots) for m in self.lora_modules)

    def _forward(self, size: int, lora_key: tuple | None) -> torch.Tensor:
        d = self.dev
        lora = None
        if lora_key is not None and any(lora_key):
            lora = LoRAStep(build_lora_meta(d[SLOTS, :size], self.max_loras), self.ops,
                            self.all_slots)
        batch = Batch(positions=d[POS, :size].view(size, 1), prefill=False, lora=lora,
                      cache_rows=d[ROWS, :size], kv_len=self.max_len)
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
        """Decode one token for each of B rows; returns logits [B, V] (valid until next run)."""
        B = len(ids)
        size = self.bucket(B)
        h = self.host_np
        h[IDS, :B], h[POS, :B], h[ROWS, :B], h[SLOTS, :B] = ids, positions, rows, slots
        h[IDS, B:size], h[POS, B:size], h[ROWS, B:size], h[SLOTS, B:size] = 0, 0, self.pad_row, -1
        self.dev.copy_(self.host, non_blocking=True)  # 4 x n longs: one small copy
        key = (size, self._lora_key(slots))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        entry[0].replay()
        return entry[1][:B]
