"""Overnight bulk workload: seeded synthetic multi-tenant requests through the engine (JSON out).

GPU: ``PYTHONPATH=. python3 benchmarks/bulk.py --device cuda`` (``make bench-bulk``). Llama-3-8B
shapes, dummy weights; 2,000 requests with log-normal prompts (median 400, 50..4,000 tokens)
and answers (median 150, 1..1,000 tokens, ``max_tokens`` with ignore_eos, greedy); 200
adapters r8/16/32/64 on q/k/v/o with Zipf(1.1) popularity over 32 GPU slots' memory (rank 64),
shared by rank among up to 96 resident adapters (``lora_memory_slots``); 30% of requests
open with one of 20 tenant templates (500..1,500 tokens, then the request's own text, at
most 4,000 tokens in all) and use the adapter the template belongs to.
CPU: ``--device cpu --tiny``: the same generator scaled down, on a tiny random Llama.

Three runs, each on a fresh engine: mixed (adapters, prefix caching), no_adapters (the same
requests without adapters), prefix_off (adapters, no prefix caching). Each warms up untimed
on the first 2 x max_num_seqs (at most --requests) requests of the seed + 1 workload (other
template tokens, so the warm-up leaves no prefix hits), then times ``engine.generate`` over
all requests. ``--sweep-batch``/``--sweep-adapters`` add mixed runs per max_num_seqs / per
number of adapters, ``--plot`` draws them.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.testing import make_tiny_llama, make_tiny_tokenizer, write_random_adapter

SPECS = {
    "gpu": {"requests": 2000, "prompt": (400, 0.8, 50, 4000), "answer": (150, 0.8, 1, 1000),
            "adapters": 200, "ranks": (8, 16, 32, 64), "zipf_s": 1.1, "slots": 96,
            "memory_slots": 32, "max_lora_rank": 64, "prefixes": 20, "prefix_len": (500, 1500),
            "prefix_share": 0.3, "max_model_len": 5120, "max_num_seqs": 256,
            "files_per_rank": 4},
    "tiny": {"requests": 60, "prompt": (40, 0.8, 5, 200), "answer": (8, 0.8, 1, 32),
             "adapters": 12, "ranks": (8, 16), "zipf_s": 1.1, "slots": 4,
             "memory_slots": 4, "max_lora_rank": 16, "prefixes": 4, "prefix_len": (48, 96),
             "prefix_share": 0.3, "max_model_len": 256, "max_num_seqs": 16,
             "files_per_rank": 0},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GOALS = {"mixed_tok_per_s_min": 15000, "mixed_tok_per_s_on": "H200",
         "lora_overhead_max": 0.10, "prefix_speedup_min": 1.5}
RUNS = ("mixed", "no_adapters", "prefix_off")
# mixed with prefill steps on the padded [B, S] batch instead of the real tokens only;
# mixed with prefill and decode steps alternating (no decode rows in prefill steps);
# mixed with the requests of each template grouped at its first one (what a claim policy
# preferring jobs that share a prefix would hand the engine)
# mixed with one decode step per scheduling round (num_scheduler_steps=1)
# mixed with the requests submitted as generated (generate(order="input")) instead of the
# longest answers first, generate's default
EXTRA_RUNS = ("padded_prefill", "alternate", "grouped", "one_step", "input_order")
# cache_stats() figures that accumulate over the engine's life: reported as timed-run deltas
COUNTERS = {"prefix_query_tokens", "prefix_hit_tokens", "preemptions", "held_rounds", "steps",
            "seconds", "mixed",
            "tokens", "rows", "hits", "misses", "evictions", "load_seconds", "rounds",
            "adapters", "lora_ranks"}


@dataclasses.dataclass
class Workload:
    """Requests as parallel lists; ``adapter[i]`` indexes adapters in popularity order."""

    prompts: list[list[int]]
    max_tokens: list[int]
    adapter: list[int]
    prefix: list[int | None]  # the template a request opens with, or None
    template_len: list[int]   # tokens of each template


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def make_workload(spec: dict, n: int, vocab: int, seed: int) -> Workload:
    """``n`` requests; template j belongs to adapter ``owner[j]`` (drawn by popularity)."""
    rng = random.Random(seed)
    ids = range(10, min(vocab, 30000))
    weights = [1 / (i + 1) ** spec["zipf_s"] for i in range(spec["adapters"])]
    owners = rng.choices(range(spec["adapters"]), weights, k=spec["prefixes"])
    templates = [rng.choices(ids, k=rng.randint(*spec["prefix_len"]))
                 for _ in range(spec["prefixes"])]
    w = Workload([], [], [], [], [len(t) for t in templates])
    hi = spec["prompt"][3]
    for _ in range(n):
        tail = rng.choices(ids, k=_lognormal(rng, *spec["prompt"]))
        adapter = rng.choices(range(spec["adapters"]), weights)[0]
        prefix = rng.randrange(spec["prefixes"]) if rng.random() < spec["prefix_share"] \
            else None
        if prefix is not None:  # a template plus the request's own text, at most `hi` tokens
            adapter = owners[prefix]
            tail = (templates[prefix] + tail)[:hi]
        w.prompts.append(tail)
        w.max_tokens.append(_lognormal(rng, *spec["answer"]))
        w.adapter.append(adapter)
        w.prefix.append(prefix)
    return w


def describe(w: Workload, spec: dict, ranks: list[int]) -> dict:
    def dist(xs):
        return {"median": statistics.median(xs), "mean": round(statistics.fmean(xs), 1),
                "min": min(xs), "max": max(xs), "total": sum(xs)}
    used = {t for t in w.prefix if t is not None}
    repeats = sum(w.template_len[t] for t in w.prefix if t is not None) \
        - sum(w.template_len[t] for t in used)
    return {"requests": len(w.prompts), "prompt_tokens": dist([len(p) for p in w.prompts]),
            "prompt_tokens_untemplated": dist([len(p) for p, t in zip(w.prompts, w.prefix)
                                               if t is None]),
            "answer_tokens": dist(w.max_tokens), "adapters": spec["adapters"],
            "adapters_used": len(set(w.adapter)),
            "ranks": {r: ranks.count(r) for r in sorted(set(ranks))},
            "zipf_s": spec["zipf_s"], "gpu_slots": spec["memory_slots"],
            "resident_adapters_max": spec["slots"],
            "top_adapter_share": round(w.adapter.count(0) / len(w.adapter), 3),
            "templates": spec["prefixes"], "template_len": list(spec["prefix_len"]),
            "requests_with_template": sum(p is not None for p in w.prefix),
            # template tokens after each template's first use: the most prefix caching saves
            "template_tokens_repeated": repeats,
            "targets": TARGETS, "greedy": True, "ignore_eos": True}


# dense bf16 tensor-core FLOP/s and HBM bytes/s from the vendors' data sheets
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def roofline(w: Workload, config: dict, block_size: int, batch: int) -> dict:
    """What the hardware allows for this workload at best: prefill and decode FLOPs at peak
    compute (template blocks after a template's first use cached, never evicted), decode
    reads (weights once per step of ``batch`` full rows, every row's keys/values each step)
    at peak bandwidth. Summed (no overlap) and maxed (perfect overlap of compute and reads)
    -> output tokens/s; the same without prefix caching bounds what caching can gain."""
    L, H, V = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    D = config.get("head_dim") or H // heads
    q, kv = heads * D, (config.get("num_key_value_heads") or heads) * D
    params = L * (H * (q + 2 * kv) + q * H + 3 * H * config["intermediate_size"])
    out = sum(w.max_tokens)
    ctx = sum(m * len(p) + m * (m - 1) / 2 for p, m in zip(w.prompts, w.max_tokens))
    kv_bytes = L * 2 * kv * 2 * ctx
    weight_bytes = 2 * (params + H * V) * out / batch

    def prefill_flops(cached: bool) -> tuple[int, float]:
        seen, prefill, attn = set(), 0, 0.0
        for p, t in zip(w.prompts, w.prefix):
            skip = (w.template_len[t] // block_size) * block_size \
                if cached and t is not None and t in seen else 0
            seen.add(t)
            new = len(p) - skip
            prefill += new
            attn += 4 * L * q * (new * skip + new * (new + 1) / 2)
        return prefill, 2 * params * prefill + attn + 2 * H * V * len(w.prompts)

    prefill, pre_flops = prefill_flops(True)
    # fp8 weights and KV (quantization="fp8", kv_cache_dtype="fp8"): the linears' FLOPs at
    # twice the bf16 peak and half their weight bytes, half the keys/values; attention and
    # the LM head stay bf16
    linear_flops = 2 * params * (prefill + out)
    fp8_reads = kv_bytes / 2 + (params + 2 * H * V) * out / batch
    prefill_off, pre_flops_off = prefill_flops(False)
    decode_flops = (2 * params + 2 * H * V) * out + 4 * L * q * ctx
    flops, flops_off = pre_flops + decode_flops, pre_flops_off + decode_flops
    res = {"prefill_tokens_uncached": prefill, "prefill_tokens_no_prefix_cache": prefill_off,
           "pflop": round(flops / 1e15, 2), "pflop_no_prefix_cache": round(flops_off / 1e15, 2),
           "decode_kv_gb": round(kv_bytes / 1e9, 1), "batch": batch}
    for gpu, (fl, bw) in PEAKS.items():
        c, c_off, m = flops / fl, flops_off / fl, (kv_bytes + weight_bytes) / bw
        res[gpu] = {"compute_s": round(c, 1), "reads_s": round(m, 1),
                    "tok_per_s_no_overlap": round(out / (c + m)),
                    "tok_per_s_full_overlap": round(out / max(c, m)),
                    # caching on over off at best: prompt compute saved, nothing else
                    "prefix_speedup_no_overlap": round((c_off + m) / (c + m), 3),
                    "prefix_speedup_full_overlap": round(max(c_off, m) / max(c, m), 3)}
        c8, m8 = (flops - linear_flops / 2) / fl, fp8_reads / bw
        res[gpu]["fp8"] = {"compute_s": round(c8, 1), "reads_s": round(m8, 1),
                           "tok_per_s_no_overlap": round(out / (c8 + m8)),
                           "tok_per_s_full_overlap": round(out / max(c8, m8))}
    return res


def build_model(tiny: bool, root: Path) -> tuple[str, dict, str]:
    """(model dir, its config.json, load_format)."""
    if tiny:
        model = make_tiny_llama(root / "tiny", max_position_embeddings=1024)
        return str(model), json.loads((model / "config.json").read_text()), "auto"
    from throughput import LLAMA3_8B

    model = root / "llama3-8b-dummy"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    make_tiny_tokenizer(model)
    return str(model), LLAMA3_8B, "dummy"


def adapter_ranks(spec: dict, seed: int) -> list[int]:
    """The rank of each of the workload's adapters (popularity order)."""
    rng = random.Random(seed)
    return [rng.choice(spec["ranks"]) for _ in range(spec["adapters"])]


def build_adapters(spec: dict, config: dict, root: Path,
                   seed: int) -> tuple[list[LoRARequest], list[int]]:
    """A LoRARequest per adapter (ids 1..n, popularity order) and its rank. With
    ``files_per_rank`` k > 0, adapters of one rank share k files (distinct ids all the same,
    so distinct cache entries and slots)."""
    ranks = adapter_ranks(spec, seed)
    k = spec["files_per_rank"]
    paths = {}
    reqs = []
    for i, r in enumerate(ranks):
        key = (r, i % k) if k else (r, i)
        if key not in paths:
            paths[key] = str(write_random_adapter(root / f"r{r}-{key[1]}", config, r=r,
                                                  seed=len(paths), target_modules=TARGETS))
        reqs.append(LoRARequest(f"a{i}", i + 1, paths[key]))
    return reqs, ranks


def engine_config(spec: dict, args, model: str, load_format: str, run: str,
                  max_num_seqs: int) -> tuple[EngineConfig, list[str]]:
    """The run's EngineConfig and the keys this engine's EngineConfig does not have."""
    kw = {"model": model, "device": args.device, "load_format": load_format,
          "enable_lora": run != "no_adapters", "max_loras": spec["slots"],
          "max_cpu_loras": spec["adapters"], "max_lora_rank": spec["max_lora_rank"],
          "max_num_seqs": max_num_seqs, "max_model_len": spec["max_model_len"],
          "seed": args.seed, "enable_prefix_caching": run != "prefix_off",
          "mixed_steps": run != "alternate"}
    if run == "one_step":
        kw["num_scheduler_steps"] = 1
    elif args.num_scheduler_steps is not None:
        kw["num_scheduler_steps"] = args.num_scheduler_steps
    optional = {"block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "prefill_min_tokens": getattr(args, "prefill_min_tokens", None),
                "prefill_max_wait": getattr(args, "prefill_max_wait", None),
                "lora_memory_slots": spec["memory_slots"] if run != "no_adapters" else None,
                "lora_load_process": None if args.lora_load_process is None
                else args.lora_load_process == "on",
                "pinned_reserve_mb": args.pinned_reserve_mb,
                # prefill_step.py builds its own Namespace without these
                "kv_cache_dtype": getattr(args, "kv_cache_dtype", None),
                "quantization": getattr(args, "quantization", None)}
    kw.update({k: v for k, v in optional.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    dropped = sorted(k for k in kw if k not in fields)
    return EngineConfig(**{k: v for k, v in kw.items() if k in fields}), dropped


def _delta(before: dict, after: dict) -> dict:
    """``after`` with every counter replaced by its growth since ``before``."""
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = _delta(before.get(k) or {}, v)
        elif k in COUNTERS and isinstance(v, (int, float)):
            out[k] = round(v - (before.get(k) or 0), 6)
        else:
            out[k] = v
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _captures(eng) -> int | None:
    graphs = getattr(getattr(eng, "runner", None), "graphs", None)
    return getattr(graphs, "captures", None)


def _progress(eng, label: str, every: float = 20.0) -> list:
    """A stderr line every ``every`` seconds of ``eng``'s steps, so a run cut short by a time
    limit still shows how far it got and at what pace. Returns the list into which, once a
    caller sets ``record[0] = True``, each step() appends (wall ms, prompt tokens, decode
    rows, device steps, adapters written into GPU slots): ``step_profile``'s input."""
    step, t0 = eng.step, time.perf_counter()
    state = {"last": t0, "steps": 0}
    record: list = [False]
    counts = getattr(eng, "_steps", None)
    gpu = getattr(getattr(eng, "loras", None), "gpu", None)

    def stepped():
        if record[0] and counts is not None:
            pre, dec = counts["prefill"], counts["decode"]
            b = (pre["steps"], pre["tokens"], pre["rows"], dec["steps"], dec["rows"],
                 gpu.misses if gpu is not None else 0)
            t = time.perf_counter()
            out = step()
            ms = (time.perf_counter() - t) * 1e3
            a = (pre["steps"], pre["tokens"], pre["rows"], dec["steps"], dec["rows"],
                 gpu.misses if gpu is not None else 0)
            if a[0] > b[0]:     # a prompt-bearing step: its tokens, its decode rows
                record.append((round(ms, 2), a[1] - b[1], a[2] - b[2], 1, a[5] - b[5]))
            elif a[3] > b[3]:   # a decode step or round: rows a device step, device steps
                n = a[3] - b[3]
                record.append((round(ms, 2), 0, -(-(a[4] - b[4]) // n), n, a[5] - b[5]))
        else:
            out = step()
        state["steps"] += 1
        now = time.perf_counter()
        if now - state["last"] >= every:
            s = eng.cache_stats()["steps"]
            print(f"[bulk] {label}: {state['steps']} steps in {now - t0:.0f} s (with prompt "
                  f"work {s['prefill']['steps']} in {s['prefill']['seconds']:.0f} s, decode "
                  f"{s['decode']['steps']} in {s['decode']['seconds']:.0f} s, engine totals)",
                  file=sys.stderr, flush=True)
            state["last"] = now
        return out

    eng.step = stepped
    return record


def step_profile(record: list) -> dict:
    """Where a run's step time goes, from ``_progress``'s records: prompt-bearing steps'
    wall ms fitted as a + b * prompt tokens, by token range, and the steps far above the fit
    (a compile, a capture, an adapter write, the host) with their share (the fit is made
    again without them; with the decode rows nearly constant, as in a saturated run, the
    intercept and the per-row cost cannot be told apart: only their sum means something);
    decode steps' ms per device step. Steps that wrote adapters into GPU slots are counted
    apart."""
    import numpy as np

    out = {}
    at = [i for i, r in enumerate(record[1:]) if r[1] > 0]     # their places in the records
    prompt = np.array([r for r in record[1:] if r[1] > 0], dtype=np.float64).reshape(-1, 5)
    decode = np.array([r for r in record[1:] if r[1] == 0], dtype=np.float64).reshape(-1, 5)
    if len(prompt) >= 3:
        ms, tok, rows, writes = prompt[:, 0], prompt[:, 1], prompt[:, 2], prompt[:, 4]
        X = np.stack([np.ones_like(tok), tok, rows], 1)          # ms = a + b tokens + c rows
        keep = np.ones(len(ms), dtype=bool)
        for _ in range(5):   # fitted again without the slow steps (a few 1-2 s ones skew it)
            coef, *_ = np.linalg.lstsq(X[keep], ms[keep], rcond=None)
            fit = X @ coef
            resid = ms - fit
            slow = resid > np.maximum(30.0, 0.5 * fit)
            if slow.all() or (keep == ~slow).all():
                break
            keep = ~slow
        bins = [0, 1000, 2000, 4000, 6000, 8000, 10 ** 9]
        by = []
        for lo, hi in zip(bins, bins[1:]):
            m = (tok >= lo) & (tok < hi)
            if m.any():
                by.append({"tokens": f"{lo}-{hi if hi < 10 ** 9 else ''}", "steps": int(m.sum()),
                           "median_ms": round(float(np.median(ms[m])), 1),
                           "mean_ms": round(float(ms[m].mean()), 1),
                           "mean_tokens": round(float(tok[m].mean())),
                           "mean_decode_rows": round(float(rows[m].mean()), 1)})
        w = writes > 0
        worst = np.argsort(-resid)[:8]
        out["prompt_bearing"] = {
            "steps": len(ms), "seconds": round(float(ms.sum()) / 1e3, 2),
            "fit_ms": {"intercept": round(float(coef[0]), 2),
                       "per_1k_tokens": round(float(coef[1]) * 1e3, 2),
                       "per_decode_row": round(float(coef[2]), 4),
                       # over the steps fitted (the slow ones left out); ``at`` below: the
                       # step's place in step_records
                       "r2": round(1 - float((resid[keep] ** 2).sum()) / max(
                           float(((ms[keep] - ms[keep].mean()) ** 2).sum()), 1e-9), 3)},
            "by_tokens": by,
            "slow_steps": int(slow.sum()),
            "slow_excess_seconds": round(float(resid[slow].sum()) / 1e3, 2),
            "steps_writing_adapters": int(w.sum()),
            "mean_excess_ms_writing": round(float(resid[w].mean()), 1) if w.any() else None,
            "mean_excess_ms_not_writing": round(float(resid[~w].mean()), 1)
            if (~w).any() else None,
            "worst": [{"ms": float(ms[i]), "fit_ms": round(float(fit[i]), 1),
                       "tokens": int(tok[i]), "decode_rows": int(rows[i]),
                       "adapter_writes": int(writes[i]), "at": at[i]} for i in worst]}
    if len(decode):
        per = decode[:, 0] / decode[:, 3]
        med = float(np.median(per))
        slow = per > np.maximum(2 * med, med + 20)
        out["decode"] = {
            "calls": len(per), "device_steps": int(decode[:, 3].sum()),
            "seconds": round(float(decode[:, 0].sum()) / 1e3, 2),
            "ms_per_device_step": {"median": round(med, 2),
                                   "p90": round(float(np.percentile(per, 90)), 2),
                                   "max": round(float(per.max()), 1)},
            "slow_calls": int(slow.sum()),
            "slow_excess_seconds": round(float(((per - med) * decode[:, 3])[slow].sum()) / 1e3,
                                         2),
            "calls_writing_adapters": int((decode[:, 4] > 0).sum())}
    return out


def _generate(eng, w: Workload, loras: list[LoRARequest] | None, limit: int | None,
              order: str = "longest_first"):
    """engine.generate over ``w``; adapter i runs as adapter i % limit when limited."""
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in w.max_tokens]
    reqs = None if loras is None else [loras[a % limit if limit else a] for a in w.adapter]
    return eng.generate(w.prompts, params, reqs, use_tqdm=False, order=order)


def grouped(w: Workload) -> Workload:
    """The requests reordered so that those opening with the same template follow its first
    one (the others keep their places): a claim policy that groups shared prefixes."""
    first: dict = {}
    key = [first.setdefault(("t", t) if t is not None else ("r", i), i)
           for i, t in enumerate(w.prefix)]
    return reordered(w, sorted(range(len(key)), key=lambda i: (key[i], i)))


def reordered(w: Workload, order: list[int]) -> Workload:
    """The requests of ``w`` in ``order`` (a permutation of their indices)."""
    return Workload(*([xs[i] for i in order] for xs in (w.prompts, w.max_tokens, w.adapter,
                                                        w.prefix)), w.template_len)


def _head(w: Workload, n: int) -> Workload:
    return Workload(w.prompts[:n], w.max_tokens[:n], w.adapter[:n], w.prefix[:n],
                    w.template_len)


def timed_run(ctx: dict, run: str, max_num_seqs: int, limit: int | None = None) -> dict:
    """Fresh engine, untimed warm-up, timed generate; figures of the timed part only."""
    args = ctx["args"]
    config, dropped = engine_config(ctx["spec"], args, ctx["model"], ctx["load_format"], run,
                                    max_num_seqs)
    ctx["dropped"].update(dropped)
    loras = None if run == "no_adapters" else ctx["loras"]
    eng = LLMEngine(config)
    eng.runner.pack_prefill = run != "padded_prefill"
    if args.pageable_staging and getattr(eng, "loras", None) is not None:
        eng.loras.pin_memory = False   # the A/B: loads stage in plain host memory
    record = _progress(eng, f"{run}, {max_num_seqs} rows"
                       + ("" if limit is None else f", {limit} adapters"))
    try:
        t0 = time.perf_counter()
        n = args.warmup if args.warmup is not None else 2 * max_num_seqs
        warm = _head(ctx["warm"], min(n, len(ctx["workload"].prompts)))
        _generate(eng, warm, loras, limit)
        # every decode graph now, for the adapters the warm-up made resident (an engine
        # without the method captures them as the run meets each batch size)
        warm_graphs = eng.capture_graphs() if hasattr(eng, "capture_graphs") else None
        # and every kernel variant a step can pick (LoRA launch plans, eager decode rows'
        # attention launches): compiled now, or read from Triton's cache, not mid-run
        compiled = eng.compile_kernels(use_tqdm=False) \
            if hasattr(eng, "compile_kernels") and not args.no_compile_kernels else None
        if args.preload_adapters and loras is not None:
            # a worker that served these adapters before: each in its CPU cache (read from
            # disk, in pinned staging buffers); the GPU slots stay the warm-up's
            for req in loras[:limit] if limit else loras:
                eng.add_lora(req)
        _sync(args.device)
        warm_s = time.perf_counter() - t0
        before, captures = eng.cache_stats(), _captures(eng)
        host_before = _host_pinned(args.device)
        record[0] = True
        t0 = time.perf_counter()
        work = grouped(ctx["workload"]) if run == "grouped" else ctx["workload"]
        # the grouped run's order is the point of it: generate keeps it
        outs = _generate(eng, work, loras, limit,
                         "input" if run in ("grouped", "input_order") else "longest_first")
        _sync(args.device)
        seconds = time.perf_counter() - t0
        stats = _delta(before, eng.cache_stats())
        host = _host_pinned(args.device)
        after_captures = _captures(eng)
    finally:
        if getattr(eng, "loras", None) is not None:
            eng.loras.close()
        del eng
        _free(args.device)
    w = work
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    res = {"run": run, "max_num_seqs": max_num_seqs, "adapter_limit": limit,
           "requests": len(outs), "output_tokens": sum(tokens), "seconds": round(seconds, 3),
           "tok_per_s": round(sum(tokens) / seconds, 1),
           "short_outputs": sum(t < m for t, m in zip(tokens, w.max_tokens)),
           "warmup_seconds": round(warm_s, 3), "graphs_captured_after_warmup": warm_graphs,
           "compile_kernels": compiled,
           "graphs_captured_while_timed": None if captures is None
           else after_captures - captures}
    for key in ("kv", "steps"):
        if stats.get(key) is not None:
            res[key] = stats[key]
    res["step_profile"] = step_profile(record)
    # each step as recorded (wall ms, prompt tokens, decode rows, device steps, adapter
    # writes), for another look at the run later
    res["step_records"] = record[1:]
    kv = res.get("kv") or {}
    if kv.get("prefix_query_tokens"):
        kv["prefix_hit_rate"] = round(kv["prefix_hit_tokens"] / kv["prefix_query_tokens"], 4)
    res["lora_cache"] = {k: {c: v[c] for c in ("hits", "misses", "evictions", "residents",
                                               "load_seconds") if c in v}
                         for k, v in stats.items() if k in ("gpu", "cpu")}
    res["preloaded_adapters"] = bool(args.preload_adapters and loras is not None)
    if host and host_before:   # pinned host allocations made in the timed part (the loads')
        res["host_pinned"] = {"allocations": host[0] - host_before[0],
                              "alloc_seconds": round((host[1] - host_before[1]) / 1e6, 3)}
    return res


def _host_pinned(device: str) -> tuple | None:
    """(pinned blocks made, microseconds in their CUDA calls) so far, from torch's host
    allocator (None where this torch does not count them)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if device != "cuda" or stats is None:
        return None
    st = stats()
    return st.get("num_host_alloc", 0), st.get("host_alloc_time.total", 0)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def attempt(res: dict, key, fn) -> dict:
    """Run ``fn`` into ``res[key]``; a failing run (say, out of memory) keeps the others.
    A line per run goes to stderr as it ends, so a run cut short still leaves the earlier."""
    t0 = time.perf_counter()
    try:
        res[key] = fn()
    except Exception as e:  # noqa: BLE001 (reported in the JSON)
        import traceback

        traceback.print_exc()
        res[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
        _free("cuda" if torch.cuda.is_available() else "cpu")
    r = res[key]
    if isinstance(r, dict):
        print(f"[bulk] {key}: " + (r["error"] if "error" in r else
              f"{r.get('tok_per_s')} tok/s, {r.get('output_tokens')} tokens in "
              f"{r.get('seconds')} s") + f" ({time.perf_counter() - t0:.0f} s with set-up)",
              file=sys.stderr, flush=True)
    return res[key]


def derived(runs: dict) -> dict:
    """Overhead, prefix speedup, batch reached (from the mixed run) and the goals."""
    tps = {k: v.get("tok_per_s") for k, v in runs.items()}
    out = {"lora_overhead": None, "prefix_speedup": None, "batch": None}
    if tps.get("mixed") and tps.get("no_adapters"):
        out["lora_overhead"] = round(1 - tps["mixed"] / tps["no_adapters"], 4)
    if tps.get("mixed") and tps.get("prefix_off"):
        out["prefix_speedup"] = round(tps["mixed"] / tps["prefix_off"], 3)
    if tps.get("mixed") and tps.get("alternate"):   # mixed steps over alternating ones
        out["mixed_steps_speedup"] = round(tps["mixed"] / tps["alternate"], 3)
    if tps.get("mixed") and tps.get("one_step"):    # multi-step rounds over one step each
        out["multi_step_speedup"] = round(tps["mixed"] / tps["one_step"], 3)
    if tps.get("mixed") and tps.get("input_order"):  # generate's longest-first over input
        out["order_speedup"] = round(tps["mixed"] / tps["input_order"], 3)
    # claim grouping by template over arrival: both in input order when input_order ran
    # (grouped keeps its own order; mixed is longest-first)
    base = tps.get("input_order") or tps.get("mixed")
    if base and tps.get("grouped"):
        out["grouping_speedup"] = round(tps["grouped"] / base, 3)
    steps = (runs.get("mixed") or {}).get("steps") or {}
    decode, prefill = steps.get("decode") or {}, steps.get("prefill") or {}
    if decode.get("steps") or prefill.get("rows"):
        rows = decode.get("rows", 0) + prefill.get("rows", 0)
        n = decode.get("steps", 0) + prefill.get("mixed", 0)
        out["batch"] = {"decode_max_batch": decode.get("max_batch"),
                        # decode rows per step that decoded (decode-only and mixed steps)
                        "mean_rows_per_decode_step": round(rows / n, 1) if n else None}
        # distinct adapters of a step and the sum of their ranks (the rank rows its LoRA
        # needs: ~1.7 MB a rank row for q/k/v/o of Llama-3-8B), per decode-only and per
        # prompt-bearing step
        for key, kind in (("decode_only", decode), ("prompt_bearing", prefill)):
            if kind.get("steps") and "lora_ranks" in kind:
                out["batch"][f"adapters_per_{key}_step"] = round(
                    kind["adapters"] / kind["steps"], 1)
                out["batch"][f"lora_ranks_per_{key}_step"] = round(
                    kind["lora_ranks"] / kind["steps"], 1)
    out["goals"] = GOALS
    out["goals_met"] = {
        "mixed_tok_per_s": None if not tps.get("mixed")
        else tps["mixed"] >= GOALS["mixed_tok_per_s_min"],
        "lora_overhead": None if out["lora_overhead"] is None
        else out["lora_overhead"] <= GOALS["lora_overhead_max"],
        "prefix_speedup": None if out["prefix_speedup"] is None
        else out["prefix_speedup"] >= GOALS["prefix_speedup_min"]}
    return out


def merged(results: list[dict]) -> dict:
    """One output from several runs' (the sweeps split over device calls): the first one's
    header, every sweep point and run (a later one's replacing an earlier one's)."""
    out = dict(results[0])
    for key in ("runs", "sweep_batch", "sweep_adapters"):
        out[key] = {k: v for r in results for k, v in r.get(key, {}).items()}
    return out


def plot(res: dict, path: str) -> None:
    """tokens/s against max_num_seqs and against adapters in the workload (two subplots)."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'lorry[bench]' (or draw it "
                         "elsewhere from the JSON with --plot-from)") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, field, label in (
            (axes[0], "sweep_batch", "max_num_seqs", "max_num_seqs (batch rows)"),
            (axes[1], "sweep_adapters", "adapter_limit", "distinct adapters in the workload")):
        runs = sorted((r[field], r["tok_per_s"], r["kv"]["peak_running"])
                      for r in res.get(key, {}).values() if "tok_per_s" in r)
        if runs:
            xs, ys, _ = zip(*runs)
            ax.plot(xs, ys, marker="o", label="mixed")
            for x, y, peak in runs:   # how many rows the run reached, under the point
                ax.annotate(f"peak {peak} rows", (x, y), textcoords="offset points",
                            xytext=(0, -14), ha="center", fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        no_lora = res["runs"].get("no_adapters", {}).get("tok_per_s")
        if no_lora:
            ax.axhline(no_lora, ls="--", c="gray", label="no adapters (default batch)")
        ax.set(xlabel=label, ylabel="output tokens/s")
        ax.set_ylim(0, 1.12 * ax.get_ylim()[1])
        ax.legend(fontsize=8)
    fig.suptitle(f"bulk workload ({res['workload']['requests']} requests), "
                 f"{res.get('gpu') or res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda (with --tiny: cpu)")
    ap.add_argument("--tiny", action="store_true", help="the scaled-down workload, tiny Llama")
    ap.add_argument("--requests", type=int, default=None, help="default: 2000 (tiny: 60)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 (tiny: 16)")
    ap.add_argument("--slots", type=int, default=None,
                    help="adapters resident on the GPU at once, max_loras (default: 96; tiny: "
                         "4), sharing --memory-slots of memory by rank")
    ap.add_argument("--memory-slots", type=int, default=None,
                    help="LoRA weight memory in max-rank slots, shared by rank "
                         "(EngineConfig.lora_memory_slots; default: 32, tiny: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile-kernels", action="store_true",
                    help="skip LLMEngine.compile_kernels after the warm-up (the A/B: the "
                         "kernel variants the warm-up did not meet then compile mid-run)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed warm-up requests per run (default: 2 x max_num_seqs)")
    ap.add_argument("--preload-adapters", action="store_true",
                    help="load every adapter into the CPU cache after the warm-up, untimed "
                         "(a worker that served them before); default: the timed part loads "
                         "the adapters the warm-up did not meet")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS + EXTRA_RUNS,
                    help="default: the three; none (sweeps only): --runs with no name")
    ap.add_argument("--model", default=None,
                    help="a local base model dir instead of the built one (e.g. the demo "
                         "model on CPU; its config shapes the adapters)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--kv-cache-dtype", default=None,
                    help="EngineConfig.kv_cache_dtype: auto (default) or fp8")
    ap.add_argument("--quantization", default=None,
                    help="EngineConfig.quantization of the base, e.g. fp8 (W8A8)")
    ap.add_argument("--fp8-gemm", default=None, choices=["scaled_mm", "triton", "auto"],
                    help="the fp8 linears' CUDA GEMM (Fp8Linear.GEMM): torch._scaled_mm, "
                         "kernels.fp8_matmul, or the latter up to 64 rows")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--prefill-min-tokens", type=int, default=None,
                    help="EngineConfig.prefill_min_tokens: new prompts wait in decode rounds "
                         "until the free rows would take this many tokens (0: off)")
    ap.add_argument("--prefill-max-wait", type=int, default=None,
                    help="EngineConfig.prefill_max_wait: at most this many device steps")
    ap.add_argument("--num-scheduler-steps", type=int, default=None,
                    help="EngineConfig.num_scheduler_steps of every run but one_step")
    ap.add_argument("--adapter-files-per-rank", type=int, default=None,
                    help="adapters of one rank share this many files (0: a file each; "
                         "default 4, tiny 0)")
    ap.add_argument("--sweep-batch", type=int, nargs="*", default=[],
                    help="also a mixed run per max_num_seqs, e.g. 64 128 256 512")
    ap.add_argument("--sweep-adapters", type=int, nargs="*", default=[],
                    help="also a mixed run per k: only the k most popular adapters")
    ap.add_argument("--decode-config", default=None, metavar="SPEC",
                    help="the LoRA decode table for every run, as lora_kernels.py's "
                         "--decode-config ('key=value,...' over the GPU's file; default: it)")
    ap.add_argument("--load-switch-interval", type=float, default=None, metavar="SECONDS",
                    help="the GIL switch interval while adapters load (engine.lora.manager."
                         "LOAD_SWITCH_INTERVAL; 0.005, Python's own, leaves it unchanged)")
    ap.add_argument("--lora-load-process", choices=("on", "off"), default=None,
                    help="EngineConfig.lora_load_process (default: the engine's, off): "
                         "cold loads read in the loader process or in a thread (an A/B)")
    ap.add_argument("--pinned-reserve-mb", type=int, default=None,
                    help="EngineConfig.pinned_reserve_mb (default: the engine's, automatic; "
                         "0: off, each staging buffer its own cudaHostAlloc: the A/B)")
    ap.add_argument("--decode-split-keys", type=int, default=None, metavar="KEYS",
                    help="kernels.decode_attention.SPLIT_KEYS: the decode attention splits "
                         "rows' tables so that no split spans more keys (an A/B)")
    ap.add_argument("--decode-launch", default=None, metavar="BLOCK_N,STAGES",
                    help="kernels.decode_attention.BLOCK_N and NUM_STAGES, e.g. 64,2 (an A/B)")
    ap.add_argument("--pageable-staging", action="store_true",
                    help="adapter loads stage in plain (pageable) host memory, not pinned: "
                         "no cudaHostAlloc a load, each slot write a synchronous copy (an A/B)")
    ap.add_argument("--plot", default=None, help="tokens/s vs batch and vs adapters (png)")
    ap.add_argument("--plot-from", nargs="+", default=None, metavar="JSON",
                    help="only draw --plot from these earlier outputs (e.g. a GPU run's --out; "
                         "several: their sweeps and runs merged)")
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    return args


def main() -> None:
    args = parse_args()
    if args.plot_from:
        plot(merged([json.loads(Path(p).read_text()) for p in args.plot_from]),
             args.plot or "bulk.png")
        return
    spec = dict(SPECS["tiny" if args.tiny else "gpu"])
    for key, value in (("requests", args.requests), ("max_num_seqs", args.max_num_seqs),
                       ("files_per_rank", args.adapter_files_per_rank), ("slots", args.slots),
                       ("memory_slots", args.memory_slots)):
        if value is not None:
            spec[key] = value
    res = {"benchmark": "bulk", "device": args.device, "tiny": args.tiny, "seed": args.seed,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    if args.decode_config:   # an A/B of kernel settings on the whole workload, same code
        if args.device != "cuda":
            raise SystemExit("--decode-config sets the Triton decode table: it needs "
                             "--device cuda")
        import lora_kernels
        from lorry.kernels import lora_decode

        lora_decode.DECODE_CONFIG = lora_kernels.parse_decode_config(args.decode_config)
        res["decode_config"] = args.decode_config
    if args.load_switch_interval is not None:   # an A/B of the loads' GIL hand-over
        from lorry.engine.lora import manager

        manager.LOAD_SWITCH_INTERVAL = args.load_switch_interval
        res["load_switch_interval"] = args.load_switch_interval
    if args.pageable_staging:
        res["pageable_staging"] = True
    if args.decode_split_keys is not None:   # an A/B of the decode attention's splits
        from lorry.kernels import decode_attention

        decode_attention.SPLIT_KEYS = args.decode_split_keys
        res["decode_split_keys"] = args.decode_split_keys
    if args.decode_launch:   # an A/B of the decode attention's tile and pipeline depth
        from lorry.kernels import decode_attention

        block_n, stages = (int(x) for x in args.decode_launch.split(","))
        decode_attention.BLOCK_N, decode_attention.NUM_STAGES = block_n, stages
        res["decode_launch"] = {"block_n": block_n, "num_stages": stages}
    if args.fp8_gemm:   # an A/B of the fp8 linears' GEMM
        from lorry.engine.quant.onthefly import Fp8Linear

        Fp8Linear.GEMM = args.fp8_gemm
        res["fp8_gemm"] = args.fp8_gemm
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        res["alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    with tempfile.TemporaryDirectory(prefix="lorry-bulk-") as tmp:
        if args.model:
            model, load_format = args.model, "auto"
            config = json.loads((Path(args.model) / "config.json").read_text())
        else:
            model, config, load_format = build_model(args.tiny, Path(tmp))
        loras, ranks = build_adapters(spec, config, Path(tmp), args.seed)
        vocab = config["vocab_size"]
        ctx = {"args": args, "spec": spec, "model": model, "load_format": load_format,
               "loras": loras, "dropped": set(),
               "workload": make_workload(spec, spec["requests"], vocab, args.seed),
               "warm": make_workload(spec, 2 * max([spec["max_num_seqs"], *args.sweep_batch]),
                                     vocab, args.seed + 1)}
        res["workload"] = describe(ctx["workload"], spec, ranks)
        res["workload"]["warmup"] = (f"untimed: the first {args.warmup} requests" if
                                     args.warmup is not None else
                                     "untimed: the first 2 x max_num_seqs (at most "
                                     f"{spec['requests']}) requests of the seed "
                                     f"{args.seed + 1} workload")
        res["workload"]["adapter_files"] = len({r.lora_path for r in loras})
        res["engine"] = {k: spec[k] for k in ("max_model_len", "max_num_seqs", "slots",
                                              "max_lora_rank")}
        res["engine"]["memory_slots"] = spec["memory_slots"]
        res["engine"]["kv_cache_dtype"] = args.kv_cache_dtype or "auto"
        res["engine"]["quantization"] = args.quantization
        res["runs"] = {}
        for run in args.runs:
            attempt(res["runs"], run, lambda run=run: timed_run(ctx, run, spec["max_num_seqs"]))
        res.update(derived(res["runs"]))
        res["roofline"] = roofline(ctx["workload"], config, args.block_size or 16,
                                   spec["max_num_seqs"])
        sweeps(ctx, res)
        res["dropped_config_keys"] = sorted(ctx["dropped"])
        if ctx["dropped"]:
            res["note"] = ("this engine's EngineConfig lacks " + ", ".join(res[
                "dropped_config_keys"]) + ": those settings were not applied")
    if args.plot:
        attempt(res, "plot", lambda: plot(res, args.plot) or args.plot)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def sweeps(ctx: dict, res: dict) -> None:
    """Mixed runs per max_num_seqs and per adapter count (only when asked)."""
    args = ctx["args"]
    if args.sweep_batch:
        res["sweep_batch"] = {}
        for b in args.sweep_batch:
            attempt(res["sweep_batch"], str(b), lambda b=b: timed_run(ctx, "mixed", b))
    if args.sweep_adapters:
        res["sweep_adapters"] = {}
        for k in args.sweep_adapters:
            attempt(res["sweep_adapters"], str(k),
                    lambda k=k: timed_run(ctx, "mixed", ctx["spec"]["max_num_seqs"], k))


if __name__ == "__main__":
    main()
