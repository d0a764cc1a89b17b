"""Model runner: turns scheduled sequences into padded tensors, runs the model, returns logits."""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch

from lorry.engine.model.layers import LoRAStep
from lorry.engine.model.llama import Batch
from lorry.engine.sequence import Sequence
from lorry.kernels.segments import build_lora_meta


class ModelRunner:
    """Owns the device-side inputs of each step; LoRA metadata is built once per step."""

    def __init__(self, model, ops, max_loras: int, device: torch.device, graphs=None,
                 block_size: int = 16):
        self.model, self.ops, self.max_loras, self.device = model, ops, max_loras, device
        # where each slot's adapter lies in the LoRA row buffers (the slot manager's
        # kernels.segments.SlotRows, set by engine.setup)
        self.slot_rows = None
        self.block_size = block_size
        # prefill steps run the layers on the real tokens only (no padding rows); False: on
        # the padded [B, S] batch (for comparisons)
        self.pack_prefill = True
        self.graphs = graphs  # engine.graphs.DecodeGraphs on CUDA unless enforce_eager
        self.logits_hook = None  # optional callable(seqs, logits) for tests and diagnostics
        # held around graph replays (which may capture): adapter loader threads take it to
        # allocate pinned memory, a CUDA call that would invalidate a capture in progress
        self.graph_lock = contextlib.nullcontext()

    def _packing(self, lens: list[int], slots: list[int], S: int, extra: list[int] = ()):
        """(pad_index, LoRA step) of a right-padded [B, S] prefill: the layers compute only
        the real tokens unless every row is full (or packing is off). ``extra``: the slots of
        decode rows whose tokens follow the prefill's (a mixed step)."""
        lens_a, slots_a = np.asarray(lens, dtype=np.int64), np.asarray(slots, dtype=np.int32)
        if not self.pack_prefill or int(lens_a.sum()) == len(lens) * S:
            per_token = np.where(np.arange(S) < lens_a[:, None], slots_a[:, None], -1)
            return None, self._lora(np.concatenate([per_token.reshape(-1),
                                                    np.asarray(extra, dtype=np.int32)]))
        index = np.concatenate([np.arange(b * S, b * S + n) for b, n in enumerate(lens)])
        return (self._tensor(index),
                self._lora(np.concatenate([np.repeat(slots_a, lens_a),
                                           np.asarray(extra, dtype=np.int32)])))

    def _lora(self, token_slots) -> LoRAStep | None:
        """The step's LoRA data from each token's slot (a list or an int32 array; -1: none)."""
        slots = np.asarray(token_slots, dtype=np.int32)
        used = frozenset(np.unique(slots[slots >= 0]).tolist())
        if not used or self.ops is None:
            return None
        t = torch.from_numpy(slots).to(self.device)
        per_slot = int((slots >= 0).sum()) // len(used)    # tokens a slot holds, on average
        return LoRAStep(build_lora_meta(t, self.max_loras, self.slot_rows, per_slot), self.ops,
                        used)

    def _tensor(self, rows) -> torch.Tensor:
        if isinstance(rows, np.ndarray):
            return torch.from_numpy(rows.astype(np.int64, copy=False)).to(self.device)
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _slots(self, seqs: list[Sequence], starts: list[int], lens: list[int], S: int,
               bs: int) -> torch.Tensor:
        """KV slot of each token of a right-padded [B, S] step (padding: the null block)."""
        out = np.zeros((len(seqs), S), dtype=np.int64)
        for row, s, a, n in zip(out, seqs, starts, lens):
            p = np.arange(a, a + n)
            table = np.asarray(s.block_table[a // bs:(a + n - 1) // bs + 1], dtype=np.int64)
            row[:n] = table[p // bs - a // bs] * bs + p % bs
        return self._tensor(out.reshape(-1))

    def _tables(self, seqs: list[Sequence], n_blocks: int) -> torch.Tensor:
        """[B, n_blocks] int32 block tables (past a sequence's own blocks: the null block),
        filled row by row in numpy (a nested list through torch.tensor costs ~6x more host
        time for hundreds of long rows, as in a mixed step's decode rows; one flat list
        scattered under a mask, 1.5x more)."""
        out = np.zeros((len(seqs), n_blocks), dtype=np.int32)
        for row, s in zip(out, seqs):
            t = s.block_table[:n_blocks]
            row[:len(t)] = t
        return torch.from_numpy(out).to(self.device)

    @torch.inference_mode()
    def forward_prompts(self, prompts: list[list[int]], slots: list[int],
                        slot_mapping: torch.Tensor | None = None,
                        all_logits: bool = False) -> torch.Tensor:
        """Prefill right-padded prompts from position 0, their keys/values written at
        ``slot_mapping`` [B*S] (None: not cached, as for scoring). Returns [B, V] last-token
        logits ([B, S, V] if all)."""
        S = max(len(p) for p in prompts)
        ids = self._tensor([p + [0] * (S - len(p)) for p in prompts])          # [B, S]
        positions = torch.arange(S, device=self.device).expand(len(prompts), S)
        pad_index, lora = self._packing([len(p) for p in prompts], slots, S)
        batch = Batch(positions=positions, prefill=True, lora=lora, pad_index=pad_index,
                      slot_mapping=slot_mapping, block_size=self.block_size)
        last = None if all_logits else self._tensor([len(p) - 1 for p in prompts])
        return self.model(ids, batch, last)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], slots: list[int],
                chunks: list[int] | None = None) -> torch.Tensor:
        """Prefill the next ``chunks[i]`` tokens of each sequence's prefill tokens (default:
        all), after its ``num_computed_tokens`` cached ones; the sequences after the first
        len(chunks) decode one token each in the same step (a mixed step). Returns [B, V]
        logits of each chunk's last token (meaningful for sequences whose prefill the chunk
        completes), then of each decoding row."""
        chunks = chunks or [s.prefill_len - s.num_computed_tokens for s in seqs]
        n = len(chunks)
        pre, dec = seqs[:n], seqs[n:]
        starts = [s.num_computed_tokens for s in pre]
        toks = [s.prefill_tokens[a:a + c] for s, a, c in zip(pre, starts, chunks)]
        S, bs = max(chunks), self.block_size
        ids = np.zeros((n, S), dtype=np.int64)
        for row, t in zip(ids, toks):
            row[:len(t)] = t
        ids = self._tensor(ids)                                                       # [B, S]
        pad_index, lora = self._packing(chunks, slots[:n], S, slots[n:])
        batch = Batch(positions=None, prefill=True, lora=lora, pad_index=pad_index,
                      slot_mapping=self._slots(pre, starts, chunks, S, bs), block_size=bs,
                      decode=self._decode_rows(dec) if dec else None)
        if self.model.longrope:   # rope factors by the whole prompt's length
            batch.rope_top = self._tensor([s.prefill_len - 1 for s in pre])
        if not any(starts):   # whole prompts from position 0
            batch.positions = torch.arange(S, device=self.device).expand(n, S)
        else:
            # padding repeats each row's last position: it attends to real keys only
            steps = torch.minimum(torch.arange(S, device=self.device)[None, :],
                                  self._tensor(chunks)[:, None] - 1)
            batch.positions = self._tensor(starts)[:, None] + steps                   # [B, S]
            batch.chunked = True
        # every row's keys through its block table (the paged prefill kernel on CUDA reads
        # them so, from position 0 too), and each row's queries: where they start among
        # the packed real tokens, how many, and the position of the first
        batch.kv_len = max(a + c for a, c in zip(starts, chunks))
        batch.block_tables = self._tables(pre, -(-batch.kv_len // bs))
        batch.rows = torch.tensor([list(itertools.accumulate(chunks, initial=0))[:n], chunks,
                                   starts], dtype=torch.int32, device=self.device)
        flat = batch.positions.reshape(-1)
        batch.token_positions, batch.token_slots = (flat, batch.slot_mapping) \
            if pad_index is None else (flat.index_select(0, pad_index),
                                       batch.slot_mapping.index_select(0, pad_index))
        logits = self.model(ids, batch, self._tensor([c - 1 for c in chunks]))
        if self.logits_hook:  # only the rows whose prefill this step completes are sampled
            done = [i for i, (s, a, c) in enumerate(zip(pre, starts, chunks))
                    if a + c == s.prefill_len] + list(range(n, len(seqs)))
            if done:
                self.logits_hook([seqs[i] for i in done], logits[done])
        return logits

    def _decode_rows(self, seqs: list[Sequence], steps: int = 1) -> Batch:
        """The decode inputs of one token per sequence (its KV slot reserved by the
        scheduler): a decode step's batch, or the decode part of a mixed step. ``steps``:
        the block tables reach as far as that many steps go (the scheduler reserved them)."""
        bs = self.block_size
        pos = [s.num_tokens - 1 for s in seqs]
        kv_len = max(pos) + 1
        # positions, KV slots and tokens in one array: one copy to the device, not three
        host = np.empty((3, len(seqs)), dtype=np.int64)
        host[0] = pos
        host[1] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        host[2] = [s.last_token for s in seqs]
        dev = torch.from_numpy(host).to(self.device)
        return Batch(positions=dev[0].view(-1, 1), prefill=False, block_size=bs,      # [B, 1]
                     kv_len=kv_len, slot_mapping=dev[1],
                     block_tables=self._tables(seqs, -(-(kv_len + steps - 1) // bs)),
                     input_ids=dev[2])

    @torch.inference_mode()
    def decode_steps(self, seqs: list[Sequence], slots: list[int], steps: int,
                     pick) -> torch.Tensor:
        """A round of ``steps`` decode steps (the scheduler reserved their KV slots): each
        step's tokens, ``pick(logits [B, V], out [B])`` on the device, are the next step's
        inputs. Returns the tokens [steps, B] (on the device: one read for the round)."""
        if self.graphs is not None and self.graphs.bucket(len(seqs)) is not None \
                and not self.model.uses_slot_modules(slots):
            with self.graph_lock:
                return self.graphs.run_steps(seqs, slots, steps, pick)
        B, bs = len(seqs), self.block_size
        batch = self._decode_rows(seqs, steps)
        ids, zero = batch.input_ids, torch.zeros(B, dtype=torch.long, device=self.device)
        out = torch.empty(steps, B, dtype=torch.long, device=self.device)
        batch.lora = self._lora(slots)   # the same rows and slots every step
        for j in range(steps):
            if j:
                pos = batch.positions + 1                                             # [B, 1]
                batch = Batch(positions=pos, prefill=False, block_size=bs, lora=batch.lora,
                              kv_len=batch.kv_len + 1, block_tables=batch.block_tables,
                              slot_mapping=next_slots(batch.block_tables, pos[:, 0], bs))
            pick(self.model(ids[:, None], batch, zero), out[j])
            ids = out[j]
        return out

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], slots: list[int]) -> torch.Tensor:
        """One token per running sequence (its KV slot reserved by the scheduler). Returns
        [B, V] logits."""
        if self.graphs is not None and self.graphs.bucket(len(seqs)) is not None \
                and not self.model.uses_slot_modules(slots):
            with self.graph_lock:
                logits = self.graphs.run(seqs, slots)
            if self.logits_hook:
                self.logits_hook(seqs, logits)
            return logits
        batch = self._decode_rows(seqs)
        batch.lora = self._lora(slots)
        logits = self.model(batch.input_ids[:, None], batch,
                            torch.zeros(len(seqs), dtype=torch.long, device=self.device))
        if self.logits_hook:
            self.logits_hook(seqs, logits)
        return logits


def next_slots(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The KV slot of position ``pos`` [B] of each row through its block table [B, n], on
    the device (a round's later steps, whose positions the host does not read)."""
    block = tables.gather(1, (pos // block_size)[:, None])[:, 0].long()
    return block * block_size + pos % block_size
