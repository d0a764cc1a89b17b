"""Kernel warm-up: one eager step of every shape class a running engine can meet.

Triton compiles a kernel once per combination of its constexprs (and of the ==1 / %16 classes
of the integers it specializes), about a second each on an H100 with the engine waiting. The
decode steps' CUDA graphs are captured ahead (``LLMEngine.capture_graphs``), but a prompt step's
token count picks the LoRA kernels' launch plan from the tuning tables
(``kernels.triton_lora.launch_key``), and a mixed step's decode rows run eagerly with a block
table as wide as their longest row, whose width and row count pick the decode attention's
split and tile (``kernels.decode_attention.launch_key``). A bulk run met new ones all through
its schedule (eleven prompt steps of 1.0-1.8 s in a 1,000-request fp8 run, 27% of its time).

:func:`probes` lists, from those host-side plan functions alone, one step shape for each key
any layer can take within the scheduler's limits, and :func:`run_probes` runs each as a real
eager step through ``ModelRunner.prefill`` on placeholder sequences whose block tables hold
only the null block (the step's keys and values are written there, which no sequence reads),
with every LoRA layer's slots marked active, so every kernel a step can pick compiles now and
the on-disk Triton cache keeps them for the next process. Nothing here changes the engine's
state: the KV cache's real blocks, the slots and the scheduler are untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lorry.engine.model import attention
from lorry.engine.outputs import RequestMetrics
from lorry.engine.sampling_params import SamplingParams
from lorry.engine.sequence import Sequence

# Token counts always probed besides the plan keys' own: the ==1 / %16 classes of kernels
# that specialize a step's row count, and the fp8 GEMM's row tiles (16, 32, 64 rows).
LADDER = (1, 2, 16, 17, 32, 33, 64, 65)


@dataclass(frozen=True)
class Probe:
    """One warm-up step: prompt rows of ``tokens`` tokens in all, spread over ``slots``
    adapter slots (one row each, more rows where a row would pass ``max_len``), each after
    ``cached`` tokens already in the cache (a chunk or a prefix hit: the paged prefill
    attention, which bases off the fused path take only then), then ``decode_rows`` decoding
    rows whose longest table is ``decode_blocks`` blocks wide."""

    tokens: int
    slots: int
    decode_rows: int = 0
    decode_blocks: int = 0
    cached: int = 0
    why: str = ""


@dataclass(frozen=True)
class Limits:
    """What the scheduler lets a step hold."""

    max_tokens: int       # max_num_batched_tokens: prompt tokens plus decoding rows
    max_rows: int         # max_num_seqs
    max_len: int          # max_model_len
    block_size: int
    max_loras: int


def lora_layer_shapes(model, runner) -> set[tuple]:
    """(hidden, rank, widths) of each distinct LoRA layer shape with slots allocated."""
    rows = runner.slot_rows
    out = set()
    for _, _, mod in model.lora_layers():
        if mod.lora_a is None or mod.lora_b is None:
            continue
        rank = rows.max_rank if rows is not None else mod.lora_a[0].shape[1]
        widths = tuple(b.shape[0] if b.dim() == 2 else b.shape[1] for b in mod.lora_b)
        out.add((mod.in_features, rank, widths))
    return out


def lora_probes(launch_key, shapes: set[tuple], lim: Limits, device) -> list[Probe]:
    """A prompt step for each launch key any layer shape takes over 1..max_tokens tokens, with
    the tokens spread over as many slots as they can fill or held by one (the decode path's
    long tiles depend on the tokens a slot holds)."""
    seen, out = set(), []
    most = min(lim.max_loras, lim.max_rows)
    # an eager decode-only step (enforce_eager, adapters with their own lm_head) holds up to
    # max_rows tokens, past the budget where max_num_seqs exceeds it
    for T in range(1, max(lim.max_tokens, lim.max_rows) + 1):
        for used in sorted({min(T, most), 1}, reverse=True):
            new = False
            for shape in shapes:
                hidden, rank, widths = shape
                key = (shape, launch_key(T, lim.max_loras, hidden, rank, list(widths), device,
                                         T // used))
                if key not in seen:
                    seen.add(key)
                    new = True
            if new:
                out.append(Probe(T, used, why="lora"))
    return out


def decode_probes(attention_key, heads: set[tuple], lim: Limits, device) -> list[Probe]:
    """A mixed step (one prompt token and decoding rows) for each decode attention key over
    every decoding row count and table width an eager step can hold. ``heads``: the distinct
    (kv_heads, head_dim, cache dtype) of the model's layers."""
    seen, out = set(), []
    # decode-only steps run eagerly too where no graph serves them (enforce_eager, adapters
    # with their own lm_head): up to max_rows rows, each probe one prompt token more
    most_rows = lim.max_rows
    widest = -(-lim.max_len // lim.block_size)
    for rows in range(1, most_rows + 1):
        def keys(blocks):
            return frozenset((h, attention_key(rows, h[0], blocks * lim.block_size, h[1], h[2],
                                               device)) for h in heads)
        for blocks in _run_starts(keys, 1, widest):
            if not keys(blocks) <= seen:
                seen |= keys(blocks)
                out.append(Probe(1, 1, rows, blocks, why="decode attention"))
    return out


def _run_starts(f, lo: int, hi: int) -> list[int]:
    """The first x of each run of equal f(x) over lo..hi, for an f that never returns to a
    value it left (the decode launch's split count and tile only grow with the table's
    width), found by bisection: a few dozen calls where a scan of a 128k-token table's 8,192
    widths took seconds at start-up."""
    starts, a, fa = [lo], lo, f(lo)
    while a < hi:
        if f(hi) == fa:
            break
        b = hi                      # f(b) != fa: narrow to the first x with f(x) != fa
        while b - a > 1:
            m = (a + b) // 2
            if f(m) == fa:
                a = m
            else:
                b = m
        starts.append(b)
        a, fa = b, f(b)
    return starts


def probes(model, runner, lim: Limits) -> list[Probe]:
    """Every warm-up step of this engine: the ladder, the LoRA keys, the decode keys."""
    device = next(model.parameters()).device
    out = [Probe(T, min(T, lim.max_loras, lim.max_rows), why="rows")
           for T in LADDER if T <= lim.max_tokens]
    # chunks after cached keys, of equal and of unequal lengths (the padded and the packed
    # layouts of the paged prefill attention)
    bs = lim.block_size
    out += [Probe(n, 2, cached=bs, why="chunk") for n in (2, 3)
            if n <= lim.max_tokens and bs + 2 <= lim.max_len]
    launch_key = getattr(runner.ops, "launch_key", None)
    shapes = lora_layer_shapes(model, runner) if runner.ops is not None else set()
    if launch_key is not None and shapes:
        out += lora_probes(launch_key, shapes, lim, device)
    if attention.flash_decode(torch.empty(0, device=device)):
        from lorry.kernels.decode_attention import launch_key as attention_key
        heads = {(layer.self_attn.kv_heads, layer.self_attn.head_dim,
                  layer.self_attn.k_cache.dtype) for layer in model.layers
                 if getattr(layer.self_attn, "k_cache", None) is not None}
        if heads and lim.max_tokens > 1:
            out += decode_probes(attention_key, heads, lim, device)
    return out


def _seq(n: int, blocks: int, computed: int) -> Sequence:
    """A placeholder of ``n`` tokens, ``computed`` of them cached, whose table holds the
    null block only: a prompt row, or (computed = n) a decoding row at position n - 1."""
    s = Sequence(request_id="warm-up", prompt=None, prompt_token_ids=[0] * n,
                 params=SamplingParams(max_tokens=1), lora_request=None,
                 metrics=RequestMetrics(arrival_time=0.0))
    s.block_table = [0] * blocks
    s.num_computed_tokens = computed
    return s


def _step(runner, probe: Probe, lim: Limits) -> None:
    bs = lim.block_size
    room = lim.max_len - probe.cached                   # a row's tokens stay within max_len
    rows = max(probe.slots, -(-probe.tokens // room))
    lens = [probe.tokens // rows + (i < probe.tokens % rows) for i in range(rows)]
    seqs = [_seq(probe.cached + n, -(-(probe.cached + n) // bs), probe.cached) for n in lens]
    slots = [i % probe.slots for i in range(rows)]
    for i in range(probe.decode_rows):
        # the longest row sets the table's width; its position stays below max_len (the
        # rotary tables' length), as a real row's does, in the same width
        n = min(probe.decode_blocks * bs, lim.max_len) if i == 0 else 1
        seqs.append(_seq(n, probe.decode_blocks if i == 0 else 1, n))
        slots.append(i % lim.max_loras)
    runner.prefill(seqs, slots, lens)


def run_probes(model, runner, lim: Limits, steps: list[Probe], progress=None) -> float:
    """Run each probe as an eager step with every LoRA layer's slots active (restored after);
    returns the seconds taken. ``progress(done, total)`` after each step."""
    mods = [m for _, _, m in model.lora_layers() if m.lora_a is not None]
    saved = [m.active_slots for m in mods]
    t0 = time.perf_counter()
    try:
        for m in mods:
            m.active_slots = set(range(lim.max_loras))
        for i, p in enumerate(steps):
            _step(runner, p, lim)
            if progress is not None:
                progress(i + 1, len(steps))
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
    finally:
        for m, s in zip(mods, saved):
            m.active_slots = s
    return time.perf_counter() - t0
