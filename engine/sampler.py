"""Token sampling: greedy, temperature, top-k, top-p, each request with its own generator."""
from __future__ import annotations

import torch

from lorry.engine.sequence import Sequence


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside top-k / top-p. logits: [N, V]; top_k: [N] (0 = off); top_p: [N]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, seqs: list[Sequence], default: torch.Generator) -> list[int]:
    """logits: [B, V] fp32 -> one token id per sequence."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        temp = torch.tensor([seqs[i].params.temperature for i in rows], device=logits.device)
        top_k = torch.tensor([max(seqs[i].params.top_k, 0) for i in rows], device=logits.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=logits.device)
        probs = _filter(logits[idx] / temp[:, None], top_k, top_p).softmax(-1)   # [N, V]
        for j, i in enumerate(rows):
            gen = seqs[i].generator or default
            tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    return tokens.tolist()
