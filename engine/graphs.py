"""CUDA-graph decode: one captured model step per (batch-size bucket, LoRA layer set), replayed.

A captured step decodes the first ``size`` entries of static device buffers: token id,
position, LoRA slot and KV slot per row, and each row's block table. Rows past the batch
(padding up to the bucket) decode token 0 at position 0 through the null block, which nobody
reads. The buffers are filled from pinned host buffers with two copies; the LoRA metadata is
built inside the graph. A step is: host fill -> H2D copies -> replay -> logits [B, V].
"""
from __future__ import annotations

import torch

from lorry.engine.model.layers import LoRAStep
from lorry.engine.model.llama import Batch
from lorry.engine.runner import next_slots
from lorry.kernels.segments import build_lora_meta

IDS, POS, SLOTS, KV = range(4)
FOLD_MAX_ROWS = 128


def size_ladder(max_num_seqs: int) -> list[int]:
    """Bucket sizes 1, 2, 4, 8, 16, then every 16, ending at ``max_num_seqs`` (as nano-vllm)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class GraphInputs:
    """The host side of a captured step's inputs: token, position, LoRA slot and KV slot per
    row ([4, n] longs) and each row's block table ([n, blocks] int32), pinned on CUDA."""

    def __init__(self, rows: int, blocks: int, block_size: int, pin: bool = True):
        self.block_size = block_size
        self.host = torch.zeros(4, rows, dtype=torch.long)
        self.tables = torch.zeros(rows, blocks, dtype=torch.int32)
        if pin:
            self.host, self.tables = self.host.pin_memory(), self.tables.pin_memory()
        self._rows: list = [None] * rows   # (table_epoch, blocks) per table row

    def fill(self, seqs: list, slots: list[int], size: int) -> None:
        """Rows 0..B-1 from the sequences (each decodes its last token at position
        num_tokens - 1), rows B..size-1 as padding (token 0 at position 0, no adapter, the
        null block)."""
        B, bs, h = len(seqs), self.block_size, self.host.numpy()
        pos = [s.num_tokens - 1 for s in seqs]
        h[IDS, :B] = [s.last_token for s in seqs]
        h[POS, :B] = pos
        h[SLOTS, :B] = slots
        h[KV, :B] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        h[:, B:size] = 0
        h[SLOTS, B:size] = -1
        self._fill_tables(seqs, size)

    def _fill_tables(self, seqs: list, size: int) -> None:
        """A row's table is rewritten only when its table (each allocation numbers one:
        ``table_epoch``) or its length changed since the last step; tables only grow between
        allocations, by a block per block_size tokens."""
        t, seen = self.tables.numpy(), self._rows
        for i, s in enumerate(seqs):
            n = len(s.block_table)
            if seen[i] != (s.table_epoch, n):
                t[i, :n] = s.block_table
                t[i, n:] = 0
                seen[i] = (s.table_epoch, n)
        for i in range(len(seqs), size):
            if seen[i] is not None:
                t[i] = 0
                seen[i] = None


class DecodeGraphs:
    """Captures lazily, on first use of a bucket; graphs share one memory pool."""

    def __init__(self, model, ops, max_loras: int, max_num_seqs: int, max_len: int,
                 device: torch.device, block_size: int = 16):
        self.model, self.ops, self.max_loras, self.max_len = model, ops, max_loras, max_len
        self.block_size = block_size
        # layers with folded A slots take their shrink from the base matmul in steps of at
        # most this many rows (more rows: the extra matmul columns cost more than a shrink)
        self.fold_max_rows = FOLD_MAX_ROWS if hasattr(ops, "add_lora_folded") else 0
        self.sizes = size_ladder(max_num_seqs)
        n = self.sizes[-1]
        self.inputs = GraphInputs(n, -(-max_len // block_size), block_size)
        self.dev = self.inputs.host.to(device)                               # [4, n]
        self.tables = self.inputs.tables.to(device)                          # [n, blocks]
        self.zero_index = torch.zeros(n, dtype=torch.long, device=device)
        self.all_slots = frozenset(range(max_loras))
        self.slot_rows = None   # kernels.segments.SlotRows of the slot manager (engine.setup)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.lora_modules = [mod for _, _, mod in model.lora_layers()]
        self.captures = 0

    def bucket(self, batch: int) -> int | None:
        """The smallest captured size holding ``batch`` rows (None: decode eagerly)."""
        return next((s for s in self.sizes if s >= batch), None)

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
            meta = build_lora_meta(d[SLOTS, :size], self.max_loras, self.slot_rows)
            lora = LoRAStep(meta, self.ops, self.all_slots, fold=size <= self.fold_max_rows,
                            slot_modules=False)
        # kv_len is the longest possible: a host int cannot change between replays. The
        # Triton attention (the CUDA path) stops at each row's own position instead.
        batch = Batch(positions=d[POS, :size].view(size, 1), prefill=False, lora=lora,
                      slot_mapping=d[KV, :size], block_tables=self.tables[:size],
                      block_size=self.block_size, kv_len=self.max_len)
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
    def capture_all(self) -> int:
        """Capture every bucket size not captured yet, without adapters and for the LoRA
        layer set of the adapters resident now (steps then find their graphs instead of
        capturing one mid-run, ~0.3 s each for an 8B model); returns how many it captured.
        The static inputs are set to padding first (every row through the null block), so
        the eager run before each capture writes no live sequence's keys; each step refills
        them. Call between steps."""
        self.dev.zero_()
        self.dev[SLOTS] = -1
        self.tables.zero_()
        keys = [None]
        if self.ops is not None and any(m.active_slots for m in self.lora_modules):
            keys.append(self._lora_key([0]))
        n = 0
        for size in self.sizes:
            for key in keys:
                if (size, key) not in self.graphs:
                    self.graphs[(size, key)] = self._capture(size, key)
                    n += 1
        return n

    @torch.inference_mode()
    def run(self, seqs: list, slots: list[int]) -> torch.Tensor:
        """Decode one token for each sequence (its next KV slot reserved); returns logits
        [B, V] in the given order (valid until the next run)."""
        graph, logits = self._prepare(seqs, slots)
        graph.replay()
        return logits[:len(seqs)]

    def _prepare(self, seqs: list, slots: list[int]) -> tuple:
        """Fill the static inputs from the sequences; the step's (graph, logits), captured
        on first use."""
        size = self.bucket(len(seqs))
        self.inputs.fill(seqs, slots, size)
        self.dev.copy_(self.inputs.host, non_blocking=True)
        self.tables[:size].copy_(self.inputs.tables[:size], non_blocking=True)
        key = (size, self._lora_key(slots))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        return entry

    @torch.inference_mode()
    def run_steps(self, seqs: list, slots: list[int], steps: int, pick) -> torch.Tensor:
        """A round of decode steps (the rows' KV slots for all of them reserved): the first
        as ``run``, then each replay's tokens (``pick(logits, out)``), next position and its
        KV slot go into the static inputs on the device. Returns the tokens [steps, B] on
        the device."""
        B, d = len(seqs), self.dev
        out = torch.empty(steps, B, dtype=torch.long, device=d.device)
        graph, logits = self._prepare(seqs, slots)
        logits = logits[:B]
        for j in range(steps):
            graph.replay()
            pick(logits, out[j])
            if j + 1 < steps:
                d[IDS, :B] = out[j]
                d[POS, :B] += 1
                d[KV, :B] = next_slots(self.tables[:B], d[POS, :B], self.block_size)
        return out
