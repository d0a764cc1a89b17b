"""Where one mixed prefill step of the bulk workload spends its time (JSON out).

GPU: ``PYTHONPATH=. python3 benchmarks/prefill_step.py`` (Llama-3-8B shapes, dummy weights,
bulk.py's workload, adapters and engine settings). The engine runs the workload step by
step; the first mixed step after ``--skip`` steps whose prompt chunks hold at least
``--min-tokens`` tokens is replayed in place (a replay writes the same keys and values to
the same slots, so the engine goes on unchanged) and timed as it ran, without LoRA (every
row's slot -1), and with the prefill attention of the torch layers (rotary tables, cache
writes by indexing, SDPA, gathered keys for chunks) instead of the Triton rotary + cache write
and kernels.prefill_attention; the time the host takes to issue the step; then
torch.profiler tables of the replay as it ran: the kernels' GPU time and the host's time by
operator, and where the replay makes the host wait for the GPU (torch's sync debug mode).
CPU: ``--tiny`` (the scaled-down workload; times only, no profile).
``--loop N`` traces the engine's own loop instead: N whole ``step()`` calls after ``--skip``
steps (scheduling, inputs, the model, sampling, outputs), their wall time and how much of it
the GPU was busy (benchmarks/trace_gaps.py over the timeline). ``--decode`` measures a decode
round instead (the first after ``--skip`` steps with at least ``--min-rows`` rows, replayed
in place): ms per step (and without LoRA), the bytes a step reads (weights once, every
row's keys and values) and the bandwidth that implies, and the kernels of one round.
``--cprofile N`` (with ``--loop``): N more steps under cProfile; ``--run``: bulk.py's run
whose engine settings and adapters are used (e.g. no_adapters).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bulk  # benchmarks/bulk.py: workload, model, adapters, engine settings

from lorry.engine import LLMEngine, SamplingParams
from lorry.engine.model import attention


def _timer(device: str, fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return round(sorted(times)[len(times) // 2], 3)


def _profile(fn, rows: int) -> list[dict]:
    """The kernels of one ``fn()`` call by GPU time (ms), the ``rows`` longest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    return [{"kernel": e.key[:120], "ms": round(e.device_time_total / 1e3, 3),
             "share": round(e.device_time_total / total, 3), "calls": e.count}
            for e in events[:rows]]


def _host_ms(fn, repeats: int) -> float:
    """Median milliseconds the host takes to issue ``fn()`` (from an idle GPU, no sync at
    the end): near the step's GPU time when the host keeps the GPU waiting."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return round(sorted(times)[len(times) // 2], 3)


def _host_profile(fn, rows: int) -> list[dict]:
    """The host's own time by operator (self CPU ms) of one ``fn()`` call, the ``rows``
    longest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key[:80], "self_ms": round(e.self_cpu_time_total / 1e3, 3),
             "calls": e.count} for e in events[:rows]]


def _trace(fn, path: str) -> None:
    """A timeline of one ``fn()`` call (host operators with their Python stacks, CUDA runtime
    calls and kernels, for chrome://tracing or Perfetto; benchmarks/trace_gaps.py sums it):
    whether the GPU idles between kernels waiting for the host's launches, which the
    per-operator tables cannot show."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)


def _syncs(fn) -> list[dict]:
    """Where one ``fn()`` call makes the host wait for the GPU: torch's sync debug mode warns
    at every synchronizing CUDA call (a device value read on the host, a copy from pageable
    memory, ...); each distinct place once, with its count."""
    import warnings

    found: dict = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = (str(w.message)[:100], f"{w.filename}:{w.lineno}")
        found[key] = found.get(key, 0) + 1
    return [{"what": k[0], "where": k[1], "count": n} for k, n in found.items()]


def measure(eng, args, seqs, slots, chunks) -> dict:
    real = type(eng.runner).prefill
    runner, n = eng.runner, len(chunks)
    starts = [s.num_computed_tokens for s in seqs[:n]]

    def run(slot_ids=slots):
        return real(runner, seqs, slot_ids, chunks)

    def torch_attention():
        attention.PAGED_PREFILL = False
        try:
            return run()
        finally:
            attention.PAGED_PREFILL = True

    res = {"prompt_rows": n, "prompt_tokens": sum(chunks), "decode_rows": len(seqs) - n,
           "rows_after_cached_keys": sum(a > 0 for a in starts),
           "max_keys": max(a + c for a, c in zip(starts, chunks)),
           "adapters": len({s for s in slots if s >= 0}),
           "ms": _timer(args.device, run, args.repeats),
           "ms_without_lora": _timer(args.device, lambda: run([-1] * len(slots)), args.repeats),
           "ms_torch_attention": _timer(args.device, torch_attention, args.repeats)}
    res["lora_share"] = round(1 - res["ms_without_lora"] / res["ms"], 3)
    if args.device == "cuda":
        # the caching allocator going back to cudaMalloc/cudaFree (a free synchronizes the
        # device) during the replays: the pool leaves activations too little room
        keys = ("num_alloc_retries", "num_device_alloc", "num_device_free")
        before = {k: torch.cuda.memory_stats().get(k, 0) for k in keys}
        res["host_ms"] = _host_ms(run, args.repeats)
        res["allocator_during_replays"] = {k: torch.cuda.memory_stats().get(k, 0) - before[k]
                                           for k in keys}
        res["syncs"] = _syncs(run)
        res["kernels"] = _profile(run, args.rows)
        res["host_ops"] = _host_profile(run, args.rows)
        if args.trace:
            _trace(run, args.trace)
    return res


def measure_decode(eng, args, seqs, slots, steps, pick) -> dict:
    """A decode round replayed in place (each replay writes the same tokens' keys and values
    to the same reserved slots): ms per step, and the bytes a step must read (the weights
    once, every row's keys and values) against that time."""
    real = type(eng.runner).decode_steps
    runner, model = eng.runner, eng.runner.model

    def run(slot_ids=slots):   # a fresh sampler a replay: the round's own keeps its steps'
        return real(runner, seqs, slot_ids, steps, type(pick)(seqs, eng.generator, eng.device))

    ms = _timer(args.device, run, args.repeats)
    ms_plain = _timer(args.device, lambda: run([-1] * len(slots)), args.repeats)
    # the weights as stored: parameters, and quantized linears' buffers (an fp8 base's
    # qweight and scales; not the KV cache's or the rotary tables')
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers()
        if n.rsplit(".", 1)[-1] in ("qweight", "scale", "packed"))
    if getattr(model, "lm_head", None) is not None:   # the embedding is gathered, not read
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    keys = sum(s.num_tokens for s in seqs) + len(seqs) * (steps - 1) / 2   # a step's mean
    kv = keys * model.kv_block_bytes(1, model.layers[0].self_attn.k_cache.dtype)
    res = {"rows": len(seqs), "steps": steps, "adapters": len({s for s in slots if s >= 0}),
           "mean_keys": round(keys / len(seqs)),
           "max_keys": max(s.num_tokens for s in seqs) + steps - 1,
           "ms_round": ms, "ms_per_step": round(ms / steps, 3),
           "ms_per_step_without_lora": round(ms_plain / steps, 3),
           "lora_share": round(1 - ms_plain / ms, 3),
           "gb_per_step": {"weights": round(weights / 1e9, 2), "kv": round(kv / 1e9, 2)},
           "read_gb_per_s": round((weights + kv) / 1e6 / (ms / steps))}
    if args.device == "cuda":
        res["kernels"] = _profile(run, args.rows)
        if args.trace:
            _trace(run, args.trace)
    return res


def measure_loop(eng, args) -> dict:
    """``args.loop`` whole engine steps untimed by any profiler (wall time), then as many
    traced (without Python stacks, which would slow the host): the steps' kinds, and the
    GPU's busy and idle time over the traced ones (where the loop keeps it waiting)."""
    from torch.profiler import ProfilerActivity, profile

    from trace_gaps import analyse

    kinds = {"prompt": 0, "decode": 0}
    real = eng.scheduler.schedule

    def schedule(*a, **kw):
        plan = real(*a, **kw)
        if plan.seqs:
            kinds["prompt" if plan.prefill else "decode"] += 1 if plan.prefill else plan.steps
        return plan

    eng.scheduler.schedule = schedule
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def steps() -> dict:
        kinds.update(prompt=0, decode=0)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.loop):
            eng.step()
        sync()
        wall = time.perf_counter() - t0
        return {"device_steps": dict(kinds), "wall_ms": round(wall * 1e3, 1)}

    def loads() -> dict:   # adapters still loading in the background, and loaded so far
        if eng.loras is None:
            return {}
        cpu = eng.loras.stats()["cpu"]
        return {"loading": cpu["loading"], "misses": cpu["misses"],
                "load_seconds": round(cpu["load_seconds"], 2)}

    res = {"engine_steps": args.loop, "adapter_loads_before": loads(), "untraced": steps()}
    res["adapter_loads_after_untraced"] = loads()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res["traced"] = steps()
    res["adapter_loads_after_traced"] = loads()
    if args.cprofile:
        res["cprofile"] = _cprofile(eng, args.cprofile, args.rows)
        res["adapter_loads_after_cprofile"] = loads()
    eng.scheduler.schedule = real
    path = args.trace or str(Path(tempfile.gettempdir()) / "lorry_loop_trace.json")
    prof.export_chrome_trace(path)
    events = json.loads(Path(path).read_text())["traceEvents"]
    res["timeline"] = analyse(events, args.rows, 20.0)
    return res


def _cprofile(eng, steps: int, rows: int) -> dict:
    """``steps`` engine steps under cProfile: the host's wall time, and the functions with
    the most own (tottime) and inclusive (cumtime) time; a GPU wait shows as the time of
    the call that synchronises (a ``.tolist()`` or ``.item()`` of device values)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)

    def top(key: int) -> list[dict]:
        entries = sorted(st.stats.items(), key=lambda kv: kv[1][key], reverse=True)[:rows]
        return [{"fn": f"{Path(f).name}:{line}({name})", "calls": v[1],
                 "tottime_ms": round(v[2] * 1e3, 1), "cumtime_ms": round(v[3] * 1e3, 1)}
                for (f, line, name), v in entries]

    return {"steps": steps, "wall_ms": round(wall * 1e3, 1), "by_tottime": top(2),
            "by_cumtime": top(3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--requests", type=int, default=None, help="default: 2 x max_num_seqs")
    ap.add_argument("--skip", type=int, default=40, help="steps before the measured one")
    ap.add_argument("--min-tokens", type=int, default=None,
                    help="prompt tokens the measured step holds at least (default: 3/4 of "
                         "max_num_batched_tokens; tiny: 8)")
    ap.add_argument("--decode", action="store_true",
                    help="measure a decode round (CUDA graphs, no prompt work) instead")
    ap.add_argument("--min-rows", type=int, default=None,
                    help="--decode: rows the round holds at least (default: max_num_seqs / 2)")
    ap.add_argument("--loop", type=int, default=0,
                    help="trace this many whole engine steps after --skip (CUDA)")
    ap.add_argument("--run", default="mixed", choices=bulk.RUNS,
                    help="bulk.py's run whose engine settings and adapters are used")
    ap.add_argument("--cprofile", type=int, default=0,
                    help="--loop: then this many engine steps under cProfile (the host's "
                         "Python time by function)")
    ap.add_argument("--trace", default=None,
                    help="CUDA: also write a timeline of one replay here (Chrome trace JSON)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20, help="kernels in the profile table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kv-cache-dtype", default=None, help="EngineConfig.kv_cache_dtype, e.g. fp8")
    ap.add_argument("--quantization", default=None, help="EngineConfig.quantization, e.g. fp8")
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    spec = dict(bulk.SPECS["tiny" if args.tiny else "gpu"])
    cli = argparse.Namespace(device=args.device, seed=args.seed, num_scheduler_steps=None,
                             block_size=None, num_kv_blocks=None, gpu_memory_utilization=None,
                             max_num_batched_tokens=None, lora_load_process=None,
                             pinned_reserve_mb=None, kv_cache_dtype=args.kv_cache_dtype,
                             quantization=args.quantization)
    res = {"benchmark": "prefill_step", "mode": "loop" if args.loop else "decode" if args.decode else "prefill",
           "device": args.device, "tiny": args.tiny,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization}
    with tempfile.TemporaryDirectory(prefix="lorry-prefill-") as tmp:
        model, config, load_format = bulk.build_model(args.tiny, Path(tmp))
        loras, _ = bulk.build_adapters(spec, config, Path(tmp), args.seed)
        n = args.requests or 2 * spec["max_num_seqs"]
        work = bulk.make_workload(spec, n, config["vocab_size"], args.seed)
        cfg, _ = bulk.engine_config(spec, cli, model, load_format, args.run, spec["max_num_seqs"])
        if args.run == "no_adapters":
            loras = [None] * len(loras)
        eng = LLMEngine(cfg)
        min_tokens = args.min_tokens or (8 if args.tiny else cfg.max_num_batched_tokens * 3 // 4)
        warm = bulk.make_workload(spec, 32, config["vocab_size"], args.seed + 1)
        bulk._generate(eng, warm, loras, None)          # compiles the kernels, captures graphs
        res["graphs_captured_after_warmup"] = eng.capture_graphs()   # as bulk.py does
        step = {"n": 0}
        real = eng.runner.prefill

        def prefill(seqs, slots, chunks=None):
            out = real(seqs, slots, chunks)
            chunks = chunks or [s.prefill_len - s.num_computed_tokens for s in seqs]
            if ("step" not in res and step["n"] >= args.skip and len(seqs) > len(chunks)
                    and sum(chunks) >= min_tokens):
                res["step"] = step["n"]
                res.update(measure(eng, args, seqs, slots, chunks))
            return out

        real_round = eng.runner.decode_steps
        min_rows = args.min_rows or spec["max_num_seqs"] // 2

        def decode_steps(seqs, slots, steps, pick):
            if "step" not in res and step["n"] >= args.skip and len(seqs) >= min_rows:
                res["step"] = step["n"]
                res.update(measure_decode(eng, args, seqs, slots, steps, pick))
            return real_round(seqs, slots, steps, pick)

        if args.decode:
            eng.runner.decode_steps = decode_steps
        elif not args.loop:
            eng.runner.prefill = prefill
        for i, (prompt, m, a) in enumerate(zip(work.prompts, work.max_tokens, work.adapter)):
            eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=m, temperature=0.0,
                                                            ignore_eos=True), loras[a])
        while "step" not in res and eng.has_unfinished_requests():
            if args.loop and step["n"] >= args.skip:
                res["step"] = step["n"]
                res.update(measure_loop(eng, args))
                break
            eng.step()
            step["n"] += 1
        if eng.loras is not None:
            eng.loras.close()
    if "step" not in res:
        res["error"] = (f"the workload ended before step {args.skip}" if args.loop else
                        (f"no decode round of >= {min_rows} rows" if args.decode else
                         f"no mixed step with >= {min_tokens} prompt tokens")
                        + f" after {args.skip} steps") + " (more --requests, or a smaller --skip)"
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
