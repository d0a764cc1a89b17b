"""Model runner: turns scheduled sequences into padded tensors, runs the model, returns logits."""
from __future__ import annotations

import contextlib

import torch

from lorry.engine.model.layers import LoRAStep
from lorry.engine.model.llama import Batch
from lorry.engine.sequence import Sequence
from lorry.kernels.segments import build_lora_meta


class ModelRunner:
    """Owns the device-side inputs of each step; LoRA metadata is built once per step."""

    def __init__(self, model, ops, max_loras: int, device: torch.device, graphs=None):
        self.model, self.ops, self.max_loras, self.device = model, ops, max_loras, device
        self.graphs = graphs  # engine.graphs.DecodeGraphs on CUDA unless enforce_eager
        self.logits_hook = None  # optional callable(seqs, logits) for tests and diagnostics
        # held around graph replays (which may capture): adapter loader threads take it to
        # allocate pinned memory, a CUDA call that would invalidate a capture in progress
        self.graph_lock = contextlib.nullcontext()

    def _lora(self, token_slots: list[int]) -> LoRAStep | None:
        used = frozenset(s for s in token_slots if s >= 0)
        if not used or self.ops is None:
            return None
        t = torch.tensor(token_slots, dtype=torch.int32, device=self.device)
        return LoRAStep(build_lora_meta(t, self.max_loras), self.ops, used)

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward_prompts(self, prompts: list[list[int]], slots: list[int],
                        cache_rows: list[int] | None, all_logits: bool = False) -> torch.Tensor:
        """Prefill right-padded prompts. Returns [B, V] last-token logits ([B, S, V] if all)."""
        S = max(len(p) for p in prompts)
        ids = self._tensor([p + [0] * (S - len(p)) for p in prompts])          # [B, S]
        positions = torch.arange(S, device=self.device).expand(len(prompts), S)
        token_slots = [slot if j < len(p) else -1 for p, slot in zip(prompts, slots)
                       for j in range(S)]
        batch = Batch(positions=positions, prefill=True, lora=self._lora(token_slots),
                      cache_rows=None if cache_rows is None else self._tensor(cache_rows))
        last = None if all_logits else self._tensor([len(p) - 1 for p in prompts])
        return self.model(ids, batch, last)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], slots: list[int],
                chunks: list[int] | None = None) -> torch.Tensor:
        """Prefill the next ``chunks[i]`` prompt tokens of each sequence (default: the whole
        prompt), after its ``num_computed_tokens`` cached ones. Returns [B, V] logits of each
        chunk's last token (meaningful for sequences whose prompt the chunk completes)."""
        starts = [s.num_computed_tokens for s in seqs]
        chunks = chunks or [len(s.prompt_token_ids) - a for s, a in zip(seqs, starts)]
        toks = [s.prompt_token_ids[a:a + c] for s, a, c in zip(seqs, starts, chunks)]
        rows = [s.cache_row for s in seqs]
        if not any(starts):
            logits = self.forward_prompts(toks, slots, rows)
        else:
            S = max(chunks)
            ids = self._tensor([t + [0] * (S - len(t)) for t in toks])               # [B, S]
            last_pos = self.model.rotary.cos.shape[0] - 1  # never read: padding may go there
            positions = (self._tensor(starts)[:, None] + torch.arange(S, device=self.device)
                         ).clamp_(max=last_pos)                                     # [B, S]
            token_slots = [slot if j < c else -1 for c, slot in zip(chunks, slots)
                           for j in range(S)]
            batch = Batch(positions=positions, prefill=True, lora=self._lora(token_slots),
                          cache_rows=self._tensor(rows), chunked=True,
                          kv_len=max(a + c for a, c in zip(starts, chunks)))
            logits = self.model(ids, batch, self._tensor([c - 1 for c in chunks]))
        if self.logits_hook:  # only the rows whose prompt this step completes are sampled
            done = [i for i, (s, a, c) in enumerate(zip(seqs, starts, chunks))
                    if a + c == len(s.prompt_token_ids)]
            if done:
                self.logits_hook([seqs[i] for i in done], logits[done])
        return logits

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], slots: list[int],
               parked_rows: list[int] = ()) -> torch.Tensor:
        """One token per running sequence. Returns [B, V] logits.

        ``parked_rows``: KV rows of sequences still being prefilled in chunks; a captured step
        covering them writes its dummy token at the last position (never read), not at 0.
        """
        rows = [s.cache_row for s in seqs] + list(parked_rows)
        if self.graphs is not None and self.graphs.bucket(rows) is not None \
                and not self.model.uses_slot_modules(slots):
            n, park = len(parked_rows), self.graphs.max_len - 1
            with self.graph_lock:
                logits = self.graphs.run([s.last_token for s in seqs] + [0] * n,
                                         [s.num_tokens - 1 for s in seqs] + [park] * n,
                                         rows, slots + [-1] * n)[:len(seqs)]
            if self.logits_hook:
                self.logits_hook(seqs, logits)
            return logits
        ids = self._tensor([[s.last_token] for s in seqs])                      # [B, 1]
        positions = self._tensor([[s.num_tokens - 1] for s in seqs])            # [B, 1]
        rows = [s.cache_row for s in seqs]
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        batch = Batch(positions=positions, prefill=False, lora=self._lora(slots),
                      cache_rows=self._tensor(rows), kv_len=max(s.num_tokens for s in seqs),
                      row_start=rows[0] if consecutive else None)
        logits = self.model(ids, batch, torch.zeros(len(seqs), dtype=torch.long,
                                                    device=self.device))
        if self.logits_hook:
            self.logits_hook(seqs, logits)
        return logits
