"""Token sampling: penalties, greedy, temperature, top-k, top-p (each request with its own
generator), and the logprobs of the chosen tokens.

Everything here runs on the logits a step returns, after the model (eager or a CUDA-graph
replay), so penalties and logprobs behave the same on every backend and never disable graphs.
"""
from __future__ import annotations

import torch

from lorry.engine.outputs import Logprob
from lorry.engine.sequence import Sequence

# the token ``sample`` gives a row whose logits hold NaN or infinity (the engine ends it)
NOT_FINITE = -1


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside top-k / top-p. logits: [N, V]; top_k: [N] (0 = off); top_p: [N]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest prefix whose mass reaches top_p; the first token always stays (a
    # top_p that is 0 in float32, 1e-46, would drop it too: softmax of all -inf is NaN)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _padded(lists: list[list[int]], fill: int, device) -> torch.Tensor:
    """Token-id lists as one [N, L] tensor, right-padded with ``fill`` (L >= 1)."""
    width = max(1, max(map(len, lists)))
    return torch.tensor([ids + [fill] * (width - len(ids)) for ids in lists], dtype=torch.long,
                        device=device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (over prompt + output, Hugging Face's rule), then frequency and presence
    (over the output, OpenAI's rule) penalties. logits: [B, V] fp32; returns a new tensor when
    a row is penalized, else ``logits`` itself (never changed in place)."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[-1]
    N = len(rows)
    idx = torch.tensor(rows, device=dev)
    params = [seqs[i].params for i in rows]
    sub = logits.index_select(0, idx)                                            # [N, V]
    # token counts of each row's output; padding lands in the extra column V and is dropped
    out_ids = _padded([seqs[i].output_token_ids for i in rows], V, dev)         # [N, L]
    counts = torch.zeros(N, V + 1, device=dev, dtype=sub.dtype)
    counts = counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=sub.dtype))[:, :V]
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_ids = _padded([seqs[i].prompt_token_ids for i in rows], V, dev)
        seen = torch.zeros(N, V + 1, device=dev, dtype=torch.bool)
        seen = seen.scatter_(1, prompt_ids, True)[:, :V] | (counts > 0)         # [N, V]
        penalty = torch.tensor([p.repetition_penalty for p in params], device=dev,
                               dtype=sub.dtype)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev, dtype=sub.dtype)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev, dtype=sub.dtype)
    sub = sub - freq[:, None] * counts - pres[:, None] * (counts > 0).to(sub.dtype)
    # a tiny repetition_penalty (1e-40) divides finite logits into +inf: keep them finite
    big = torch.finfo(sub.dtype).max
    return logits.index_copy(0, idx, sub.clamp(-big, big))


class _Sampled:
    """The non-greedy rows of a batch: their indices, temperatures and top-k/top-p, as
    device tensors built once (a round reuses them every step)."""

    def __init__(self, seqs: list[Sequence], device):
        self.rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not self.rows:
            return
        params = [seqs[i].params for i in self.rows]
        self.idx = torch.tensor(self.rows, device=device)
        # a temperature below float32's smallest (5e-324, 1e-46) is 0 there: 0 / 0 is NaN
        self.temp = torch.tensor([p.temperature for p in params], device=device)[:, None] \
            .clamp_min(torch.finfo(torch.float32).tiny)
        # top-k/top-p sort the vocabulary: only when a row asks for them
        self.filtered = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        if self.filtered:
            self.top_k = torch.tensor([max(p.top_k, 0) for p in params], device=device)
            self.top_p = torch.tensor([p.top_p for p in params], device=device)

    def probs(self, logits: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> the sampled rows' probabilities [N, V]; top: the maxima [B, 1]
        of ``logits`` when the caller has them (a round's step: one reduction fewer)."""
        rows = logits.index_select(0, self.idx)                                  # [N, V] copy
        top = rows.amax(-1, keepdim=True) if top is None else top.index_select(0, self.idx)
        # shifted to a maximum of 0 first: a tiny temperature (1e-40) then gives -inf, never
        # +inf (whose softmax is NaN), and softmax is unchanged by the shift; a row whose
        # maximum is not finite (``finite_rows``) is zeroed, never handed to ``multinomial``
        # (on CUDA a device-side assert that ends every request of the process); in place
        # on the copy: no further [N, V] temporaries each step
        scaled = rows.sub_(top).div_(self.temp).masked_fill_(~torch.isfinite(top), 0.0)
        if self.filtered:
            scaled = _filter(scaled, self.top_k, self.top_p)
        return scaled.softmax(-1)                                                # [N, V]


def finite_rows(top: torch.Tensor) -> torch.Tensor:
    """ok [B] from the rows' logit maxima [B, 1]: a row is usable when its maximum is finite
    (no NaN, no +inf, not all -inf; -inf entries are fine). An adapter whose products
    overflow the serving dtype gives the others."""
    return torch.isfinite(top[:, 0])


def sample(logits: torch.Tensor, seqs: list[Sequence], default: torch.Generator) -> list[int]:
    """logits: [B, V] fp32 -> one token id per sequence (penalties applied first), or
    ``NOT_FINITE`` for a row whose logits hold NaN or infinity (``finite_rows``). Rows with
    their own generator (a seed) draw from it one by one; the others draw together from
    ``default``."""
    top = logits.amax(-1, keepdim=True)                                         # [B, 1]
    ok = finite_rows(top)
    penalized = apply_penalties(logits, seqs)
    tokens = penalized.argmax(dim=-1)
    sampled = _Sampled(seqs, logits.device)
    if sampled.rows:
        probs = sampled.probs(penalized, top if penalized is logits else None)
        own = [j for j, i in enumerate(sampled.rows) if seqs[i].generator is not None]
        shared = [j for j, i in enumerate(sampled.rows) if seqs[i].generator is None]
        if shared:
            j = torch.tensor(shared, device=logits.device)
            tokens[sampled.idx[j]] = torch.multinomial(probs[j], 1, generator=default)[:, 0]
        for j in own:
            i = sampled.rows[j]
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
    return tokens.masked_fill(~ok, NOT_FINITE).tolist()


class RoundSampler:
    """Picks a round's tokens on the device, step after step, without reading them: argmax
    for greedy rows, one draw from ``default`` for the sampled ones (rows without penalties,
    logprobs or their own generator: ``SamplingParams.device_sampled``)."""

    def __init__(self, seqs: list[Sequence], default: torch.Generator, device):
        self.sampled = _Sampled(seqs, device)
        self.default = default
        self._ok: list[torch.Tensor] = []   # each step's usable rows [B], on the device

    def __call__(self, logits: torch.Tensor, out: torch.Tensor) -> None:
        """Write the step's tokens [B] into ``out`` (the next step's inputs: a valid id even
        for a row whose logits are not finite; ``marked`` tells those rows)."""
        top = logits.amax(-1, keepdim=True)                                     # [B, 1]
        self._ok.append(finite_rows(top))
        torch.argmax(logits, -1, out=out)
        s = self.sampled
        if s.rows:
            out[s.idx] = torch.multinomial(s.probs(logits, top), 1,
                                           generator=self.default)[:, 0]

    def marked(self, tokens: torch.Tensor) -> torch.Tensor:
        """The round's tokens [steps, B] with ``NOT_FINITE`` where a step's logits of that row
        were not finite (one read of the round, as before)."""
        return tokens.masked_fill(~torch.stack(self._ok), NOT_FINITE)


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence],
                   tokens: list[int]) -> dict[int, dict[int, Logprob]]:
    """For each row whose request asked for logprobs: {token id: Logprob} of the chosen token
    (first) and of the ``params.logprobs`` most likely ones, from the log-softmax of the raw
    logits [B, V] (before penalties and temperature). Keys of the result are row indices."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return {}
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)          # [N, V]
    chosen_ids = torch.tensor([tokens[i] for i in rows], device=dev)[:, None]   # [N, 1]
    chosen = lp.gather(1, chosen_ids)                                           # [N, 1]
    ranks = (lp > chosen).sum(-1) + 1                                           # [N]
    k = max(seqs[i].params.logprobs for i in rows)
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], chosen_ids[:, :0])
    chosen, ranks = chosen[:, 0].tolist(), ranks.tolist()
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    out = {}
    for j, i in enumerate(rows):
        entry = {tokens[i]: Logprob(chosen[j], ranks[j])}
        for r, (tid, value) in enumerate(zip(top_ids[j][:seqs[i].params.logprobs],
                                             top_lp[j][:seqs[i].params.logprobs])):
            entry.setdefault(tid, Logprob(value, r + 1))
        out[i] = entry
    return out
