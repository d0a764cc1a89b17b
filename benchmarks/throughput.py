"""End-to-end generation throughput: HF base only, PEFT mixed-adapter batch, Lorry mixed.

CPU (default): SmolLM2-135M fp32, 16 requests over 4 adapters (r8, all linear layers),
32-token prompts, 32 new tokens -- all three in one run, printed as JSON.
GPU (``--device cuda --preset llama3-8b``): Llama-3-8B shapes with random (dummy) weights,
32 adapters r16 on q/k/v/o, 128 requests 128 -> 128 tokens, batch 64 (Lorry only by default).
``--preset qwen3-8b`` / ``gemma2-9b``: the same workload on Qwen3-8B / Gemma-2-9B shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PRESETS = {
    "smollm2": {"requests": 16, "adapters": 4, "rank": 8, "targets": "all-linear", "prompt_len": 32,
                    "new_tokens": 32, "batch": 16},
    "llama3-8b": {"requests": 128, "adapters": 32, "rank": 16, "targets": ["q_proj", "k_proj", "v_proj",
                      "o_proj"], "prompt_len": 128, "new_tokens": 128, "batch": 64},
}
PRESETS["qwen3-8b"] = PRESETS["gemma2-9b"] = PRESETS["llama3-8b"]
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
# Qwen3-8B and Gemma-2-9B shapes (their published config.json values), same workload as llama3-8b
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
            "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
             "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
             "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
             "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"}
GPU_SHAPES = {"llama3-8b": LLAMA3_8B, "qwen3-8b": QWEN3_8B, "gemma2-9b": GEMMA2_9B}


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 30000), (n, length), generator=gen).tolist()


# EngineConfig settings from the command line (--num-scheduler-steps, --kv-cache-dtype)
ENGINE_OPTIONS: dict = {}


def _engine(model: str, p: dict, device: str, load_format: str, max_loras: int):
    from lorry.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=model, device=device, max_loras=max_loras,
                                  max_cpu_loras=max_loras, max_lora_rank=max(p["rank"], 8),
                                  max_num_seqs=p["batch"],
                                  max_model_len=p["prompt_len"] + p["new_tokens"] + 8,
                                  load_format=load_format, **ENGINE_OPTIONS))


def run_lorry(eng, adapters: list[Path], n_adapters: int, prompts, p: dict, device: str) -> dict:
    """Generate ``prompts`` with requests spread round-robin over ``n_adapters`` (0: base only).

    Adapter i uses file i % len(adapters): distinct ids (own GPU slot) over shared files.
    """
    from lorry.engine import LoRARequest

    reqs = [LoRARequest(f"a{i}", i + 1, str(adapters[i % len(adapters)]))
            for i in range(n_adapters)]
    loras = [reqs[i % len(reqs)] if reqs else None for i in range(len(prompts))]
    # warm-up: the whole timed workload, so every decode graph it will use (row buckets x LoRA
    # layer sets; chunked prefill admits in waves, so several buckets) is captured and every
    # Triton kernel compiled before the clock starts. The first pass loads the adapters in the
    # background, so its admission pattern (and buckets) can differ: repeat while it captures.
    for _ in range(3):
        before = eng.runner.graphs.captures if eng.runner.graphs else 0
        eng.generate(prompts, _params(p["new_tokens"]), loras, use_tqdm=False)
        if (eng.runner.graphs.captures if eng.runner.graphs else 0) == before:
            break
    # runner.prefill: every step with prompt work, mixed steps' decode rows included
    prefill = _time_calls(eng.runner, "prefill", device)
    decode = _time_calls(eng.runner, "decode", device)
    rounds = _time_calls(eng.runner, "decode_steps", device)   # num_scheduler_steps > 1
    graphs = eng.runner.graphs
    captured = graphs.captures if graphs else 0
    _sync(device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, _params(p["new_tokens"]), loras, use_tqdm=False)
    _sync(device)
    dt = time.perf_counter() - t0
    for name in ("prefill", "decode", "decode_steps"):   # unwrap: the next variant times afresh
        eng.runner.__dict__.pop(name, None)
    captured = (graphs.captures if graphs else 0) - captured
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"adapters": n_adapters, "requests": len(prompts), "tokens": n,
            "seconds": round(dt, 3), "tok_per_s": round(n / dt, 1),
            "prefill_seconds": round(prefill[0], 3), "prefill_steps": prefill[1],
            "decode_seconds": round(decode[0], 3), "decode_steps": decode[1],
            "round_seconds": round(rounds[0], 3), "rounds": rounds[1],
            "cuda_graphs": eng.runner.graphs is not None, "lora_backend": eng.lora_backend,
            "graphs_captured_while_timed": captured}


def _params(n: int):
    from lorry.engine import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _time_calls(runner, name: str, device: str) -> list:
    """Wrap ``runner.<name>`` to add its (synchronised) time; returns the live [s, calls]."""
    acc = [0.0, 0]
    orig = getattr(type(runner), name).__get__(runner)

    def timed(*args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        out = orig(*args, **kwargs)
        _sync(device)
        acc[0] += time.perf_counter() - t
        acc[1] += 1
        return out
    setattr(runner, name, timed)
    return acc


def adapter_swap_ms(eng, adapters: list[Path], device: str, reps: int = 5) -> dict:
    """Time writing one adapter from the (pinned) CPU cache into its GPU slot: its block of the
    row buffers (one copy per targeted kind and matrix) and, in the same run, the old
    per-slice method (zero + copy per slice per layer) over the same rows."""
    from lorry.engine import LoRARequest

    req = LoRARequest("swap", 10_000, str(adapters[0]))
    eng.add_lora(req)
    weights = eng.loras.cpu.get(req)
    gpu = eng.loras.gpu
    slot = eng.loras.activate(req, set())
    first, pages = gpu.block_of[slot]
    r0, rows = first * gpu.page, pages * gpu.page

    def per_slice():  # the method before the one-copy-per-kind layout, for comparison
        for layer, _, mod in eng.model.lora_layers():
            for s, name in enumerate(mod.slice_names):
                a_rows, b_rows = mod.lora_a[s][r0:r0 + rows], mod.lora_b[s][:, r0:r0 + rows]
                a_rows.zero_()
                b_rows.zero_()
                ab = weights.tensors.get((layer, name))
                if ab is not None:
                    r = ab[0].shape[0]
                    a_rows[:r].copy_(ab[0], non_blocking=True)
                    b_rows[:, :r].copy_(ab[1], non_blocking=True)

    def timed(fn):
        times = []
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t) * 1e3)
        return times
    copies = gpu.copies
    new = timed(lambda: gpu._write(slot, first, pages, weights, []))
    old = timed(per_slice)
    eng.remove_lora(req.lora_int_id)
    return {"median_ms": _median(new), "all_ms": [round(t, 3) for t in new],
            "copies_per_swap": (gpu.copies - copies) // reps,
            "per_slice_method_median_ms": _median(old), "per_slice_all_ms": [round(t, 3) for t in old],
            "adapter_bytes": weights.nbytes, "slot_buffer_bytes": gpu.nbytes,
            "pinned": all(t.is_pinned() for ab in weights.staged.values() for t in ab)}


def _median(t: list[float]) -> float:
    return round(sorted(t)[len(t) // 2], 3)


def cold_load_overlap(eng, adapters: list[Path], prompts, p: dict, rows: int = 48,
                      idle_steps: int = 20) -> dict:
    """Decode step wall time of a running batch while a request with a cold adapter (not in
    either cache) loads in the background and is copied into a slot on the side stream, against
    idle decode steps; and what a synchronous load (the old add_request path) would stall."""
    steps, eng.scheduler.num_steps = eng.scheduler.num_steps, 1   # a token per step()
    try:
        return _cold_load_overlap(eng, adapters, prompts, p, rows, idle_steps)
    finally:
        eng.scheduler.num_steps = steps


def _cold_load_overlap(eng, adapters, prompts, p: dict, rows: int, idle_steps: int) -> dict:
    from lorry.engine import LoRARequest

    n_res = min(8, len(adapters))
    res_reqs = [LoRARequest(f"a{i}", i + 1, str(adapters[i])) for i in range(n_res)]
    for i in range(rows):
        eng.add_request(f"ov{i}", prompts[i % len(prompts)], _params(p["new_tokens"]),
                        res_reqs[i % n_res])
    while any(s.prefilling or not s.output_token_ids for s in eng.scheduler.running) \
            or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):  # warm (graph of this row count)
        eng.step()

    def step_ms():
        t = time.perf_counter()
        eng.step()
        return (time.perf_counter() - t) * 1e3
    idle = [step_ms() for _ in range(idle_steps)]
    load_before = eng.loras.cpu.load_seconds
    cold = LoRARequest("cold", 20_000, str(adapters[-1]))
    t0 = time.perf_counter()
    eng.add_request("cold", prompts[0], _params(4), cold)
    add_ms = (time.perf_counter() - t0) * 1e3
    during, seq = [], eng._seqs["cold"]
    while seq.num_computed_tokens == 0:
        if "cold" not in eng._seqs:  # its load failed: the request was failed, not admitted
            raise RuntimeError(f"the cold adapter {cold.lora_path} could not be loaded")
        during.append(step_ms())
    admitted_ms = (time.perf_counter() - t0) * 1e3
    load_ms = (eng.loras.cpu.load_seconds - load_before) * 1e3
    for rid in list(eng._seqs):
        eng.abort_request(rid)
    sync_req = LoRARequest("cold-sync", 20_001, str(adapters[-2]))
    t = time.perf_counter()
    eng.add_lora(sync_req)  # what add_request did before: the step loop waited for this
    sync_ms = (time.perf_counter() - t) * 1e3
    return {"running_rows": rows, "idle_step_median_ms": _median(idle),
            "add_request_ms": round(add_ms, 3),
            "steps_while_loading": len(during) - 1,
            "step_while_loading_median_ms": _median(during[:-1]) if len(during) > 1 else None,
            "step_while_loading_max_ms": round(max(during[:-1]), 3) if len(during) > 1 else None,
            "admission_step_ms": round(during[-1], 3),
            "background_load_ms": round(load_ms, 3), "add_to_admitted_ms": round(admitted_ms, 3),
            "synchronous_load_ms": round(sync_ms, 3)}


def lora_layout_kernel_us(eng, tokens: int = 64, reps: int = 50, device: str = "cuda") -> dict:
    """GPU time of one q/k/v add_lora (layer 0) over ``tokens`` rows spread over the resident
    adapters: the row buffers the engine uses (each slot's rows through its slot table,
    read to its rank) against per-slot stacks [L, R, H] of the same weights (the layout before
    slot memory shared by rank), with the decode kernel and with the shrink/expand pair."""
    import torch

    import lorry.kernels.triton_lora as tl_ops
    from lorry.kernels.segments import build_lora_meta

    gpu = eng.loras.gpu
    mod = eng.model.layers[0].self_attn.qkv_proj
    resident = sorted(gpu.slot_of.values())
    if not resident:
        raise RuntimeError("no adapter is resident: run the mixed batches first")
    L, R = gpu.capacity, gpu.max_rank
    table = gpu.rows.table.cpu()
    stack_a = [torch.zeros(L, R, a.shape[1], dtype=a.dtype, device=a.device) for a in mod.lora_a]
    stack_b = [torch.zeros(L, b.shape[0], R, dtype=b.dtype, device=b.device) for b in mod.lora_b]
    for slot in resident:
        first, rank = table[:, slot].tolist()
        for sa, sb, a, b in zip(stack_a, stack_b, mod.lora_a, mod.lora_b):
            sa[slot, :rank] = a[first:first + rank]
            sb[slot, :, :rank] = b[:, first:first + rank]
    x = torch.randn(tokens, mod.in_features, device=device, dtype=mod.lora_a[0].dtype)
    y = torch.zeros(tokens, sum(mod.slice_sizes), device=device, dtype=x.dtype)
    slots = torch.tensor([resident[i % len(resident)] for i in range(tokens)],
                         dtype=torch.int32, device=device)
    layouts = {"rows": (mod.lora_a, mod.lora_b, build_lora_meta(slots, L, gpu.rows)),
               "stacks": (stack_a, stack_b, build_lora_meta(slots, L))}
    out, decode = {}, tl_ops.try_add_lora_decode
    for path in ("decode_kernel", "shrink_expand"):
        if path == "shrink_expand":
            tl_ops.try_add_lora_decode = lambda *a, **k: False
        try:
            for name, (a, b, meta) in layouts.items():
                for _ in range(3):
                    tl_ops.add_lora(y, x, a, b, meta, mod.slice_offsets)
                times = []
                for _ in range(reps):
                    if device != "cuda":
                        t = time.perf_counter()
                        tl_ops.add_lora(y, x, a, b, meta, mod.slice_offsets)
                        times.append((time.perf_counter() - t) * 1e6)
                        continue
                    e0 = torch.cuda.Event(enable_timing=True)
                    e1 = torch.cuda.Event(enable_timing=True)
                    e0.record()
                    tl_ops.add_lora(y, x, a, b, meta, mod.slice_offsets)
                    e1.record()
                    e1.synchronize()
                    times.append(e0.elapsed_time(e1) * 1e3)
                out[f"{path}_{name}_us"] = _median(times)
        finally:
            tl_ops.try_add_lora_decode = decode
    out["tokens"], out["slots"], out["adapters"] = tokens, L, len(resident)
    return out


def replay_mixed_ms(eng, p: dict, n_adapters: int, reps: int = 20) -> dict:
    """Event-timed replay of the full-batch captured step with rows spread over
    ``n_adapters`` slots (and without adapters), after filling its inputs."""

    from types import SimpleNamespace

    g, B = eng.runner.graphs, p["batch"]
    n = p["prompt_len"] + 1
    nb = -(-n // g.block_size)
    # stand-in sequences at the workload's mean context, each over its own KV blocks
    seqs = [SimpleNamespace(num_tokens=n, last_token=11, table_epoch=-1 - i,
                            block_table=list(range(1 + i * nb, 1 + (i + 1) * nb)))
            for i in range(B)]
    out = {}
    for k in (0, 8, n_adapters):
        slots = [i % k for i in range(B)] if k else [-1] * B
        g.run(seqs, slots)
        key = next(key for key in g.graphs if key[0] == B and (key[1] is None) == (k == 0))
        out[f"rows{B}_adapters{k}_ms"] = _median(graph_replay_times(g.graphs[key][0], reps))
    return out


def graph_replay_times(graph, reps: int) -> list[float]:
    """Milliseconds of ``reps`` event-timed replays of a captured CUDA graph, sorted."""
    import torch

    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)


def replay_ms(graphs, reps: int = 20) -> dict:
    """GPU time of one captured decode step per captured key (median of event-timed replays)."""
    return {f"rows{size}_{'lora' if key else 'base'}":
            round(graph_replay_times(graph, reps)[reps // 2], 3)
            for (size, key), (graph, _) in graphs.graphs.items()}


def profile_decode(model: str, p: dict, load_format: str, path: str) -> None:
    """Kernel-time table of one eager decode step of a full batch (no adapters): where the
    captured step's GPU time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    eng = _engine(model, p, "cuda", load_format, 1)
    eng.scheduler.num_steps = 1   # the profiled step() is one decode step
    prompts = prompts_for(p["batch"], p["prompt_len"], 30000, seed=1)
    for i, ids in enumerate(prompts):
        eng.add_request(f"p{i}", ids, _params(8))
    eng.step()  # prefill
    eng.runner.graphs = None
    eng.step()
    eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        eng.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    Path(path).write_text(table)
    print(table)


def bench_lorry(model: str, adapters: list[Path], prompts, p: dict, device: str,
                load_format: str) -> dict:
    eng = _engine(model, p, device, load_format, len(adapters))
    return run_lorry(eng, adapters, len(adapters), prompts, p, device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bench_hf(model_dir: str, adapters: list[Path], prompts, p: dict, device: str,
             dummy: bool, caps: dict | None = None) -> dict:
    """HF base-only generate, PEFT mixed-adapter batches (``adapter_names=``) with 1/8/all
    adapters, and PEFT one adapter per batch (``set_adapter``). ``caps`` shortens GPU runs."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if dummy:  # random weights of the config's shapes, built on the device
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                    dtype=dtype).eval()
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    caps = caps or {}
    res = {}

    def timed(name, model, rows, new_tokens, groups=None, **extra):
        ids = torch.tensor([prompts[i] for i in rows], device=device)
        kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": 0}
        with torch.no_grad():
            model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]),
                           **{**kw, "max_new_tokens": 2, "min_new_tokens": 2},
                           **{k: v[:2] for k, v in extra.items()})
            _sync(device)
            t0 = time.perf_counter()
            n = 0
            for g_rows, adapter in groups or [(list(range(len(rows))), None)]:
                if adapter is not None:
                    model.set_adapter(adapter)
                g = ids[g_rows]
                out = model.generate(g, attention_mask=torch.ones_like(g), **kw,
                                     **{k: [v[i] for i in g_rows] for k, v in extra.items()})
                n += (out.shape[1] - g.shape[1]) * g.shape[0]
            _sync(device)
        dt = time.perf_counter() - t0
        res[name] = {"requests": len(rows), "new_tokens": new_tokens, "tokens": n,
                     "seconds": round(dt, 3), "tok_per_s": round(n / dt, 1)}

    all_rows = list(range(len(prompts)))
    base_rows = all_rows[:caps.get("base_requests", len(prompts))]
    timed("hf_base", base, base_rows, caps.get("base_tokens", p["new_tokens"]))
    peft = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    rows = all_rows[:caps.get("peft_requests", len(prompts))]
    tokens = caps.get("peft_tokens", p["new_tokens"])
    counts = sorted({1, min(8, len(adapters)), len(adapters)}) if caps else [len(adapters)]
    for k in counts:
        name = "peft_mixed" if k == len(adapters) else f"peft_mixed_{k}"
        timed(name, peft, rows, tokens, adapter_names=[f"a{i % k}" for i in rows])
    if caps:  # one adapter per batch: the rows of each adapter, adapter by adapter
        groups = [([j for j, i in enumerate(rows) if i % len(adapters) == a], f"a{a}")
                  for a in range(min(len(adapters), caps.get("per_adapter_groups", 8)))]
        used = sorted(j for g, _ in groups for j in g)
        groups = [([used.index(j) for j in g], a) for g, a in groups]
        timed("peft_per_adapter", peft, [rows[j] for j in used], tokens, groups=groups)
    del peft, base
    return res


def roofline(config: dict, p: dict, rank: int, n_adapters: int, gbps: float = 4300.0) -> dict:
    """Decode tokens/s if each step only read the weights (minus the embedding table, of which
    a step reads B rows) and the average KV cache once, at ``gbps`` GB/s."""
    h, i, L, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "vocab_size"))
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    weights = 2 * (L * per_layer + V * h + h)
    ctx = p["prompt_len"] + p["new_tokens"] / 2
    kv_bytes = 2 * p["batch"] * ctx * L * 2 * kv
    lora = 2 * n_adapters * L * rank * ((h + q + 2 * kv) + (q + h))  # q/k/v/o A and B
    step = (weights + kv_bytes + lora) / (gbps * 1e9)
    return {"weight_bytes": weights, "kv_bytes_per_step": int(kv_bytes), "lora_bytes": lora,
            "gb_per_s": gbps, "step_ms": round(step * 1e3, 3),
            "tok_per_s": round(p["batch"] / step, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS))
    ap.add_argument("--model", default=None, help="base model dir (CPU default: the demo model)")
    ap.add_argument("--baselines", action="store_true", help="also run HF/PEFT on GPU presets")
    ap.add_argument("--more-adapters", type=int, nargs="*", default=[128],
                    help="GPU: also run with this many adapters (an engine each)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--profile", default=None, help="GPU: only write a decode kernel profile")
    ap.add_argument("--quick", action="store_true",
                    help="GPU: only base and mixed (no 1/8 adapters, no eager run)")
    ap.add_argument("--plot", default=None, help="GPU: tokens/s vs adapters plot (png)")
    ap.add_argument("--num-scheduler-steps", type=int, default=None,
                    help="EngineConfig.num_scheduler_steps (default: the engine's)")
    ap.add_argument("--decode-launch", default=None, metavar="BLOCK_N,STAGES",
                    help="kernels.decode_attention.BLOCK_N and NUM_STAGES, e.g. 64,2 (an A/B)")
    ap.add_argument("--kv-cache-dtype", default=None,
                    help="EngineConfig.kv_cache_dtype: auto (default) or fp8")
    ap.add_argument("--quantization", default=None,
                    help="EngineConfig.quantization of the base, e.g. fp8 (W8A8)")
    ap.add_argument("--fp8-gemm", default=None, choices=["scaled_mm", "triton", "auto"],
                    help="the fp8 linears' CUDA GEMM (Fp8Linear.GEMM), as bulk.py's")
    args = ap.parse_args()
    if args.kv_cache_dtype:
        ENGINE_OPTIONS["kv_cache_dtype"] = args.kv_cache_dtype
    if args.quantization:
        ENGINE_OPTIONS["quantization"] = args.quantization
    if args.fp8_gemm:
        from lorry.engine.quant.onthefly import Fp8Linear

        Fp8Linear.GEMM = args.fp8_gemm
    if args.decode_launch:
        from lorry.kernels import decode_attention

        decode_attention.BLOCK_N, decode_attention.NUM_STAGES = (
            int(x) for x in args.decode_launch.split(","))
    if args.num_scheduler_steps is not None:
        ENGINE_OPTIONS["num_scheduler_steps"] = args.num_scheduler_steps
    preset = args.preset or ("smollm2" if args.device == "cpu" else "llama3-8b")
    p = PRESETS[preset]
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="lorry-bench-"))
    if preset in GPU_SHAPES:
        from lorry.testing import make_tiny_tokenizer

        config, load_format = GPU_SHAPES[preset], "dummy"
        model = tmp / f"{preset}-dummy"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(config))
        make_tiny_tokenizer(model)
    else:
        from lorry.engine.demo_model import demo_model_dir, prepare_demo_model

        model = Path(args.model) if args.model else prepare_demo_model(demo_model_dir(os.environ.get("LORRY_MODELS_DIR")))
        config, load_format = json.loads((model / "config.json").read_text()), "auto"
    from lorry.testing import write_random_adapter

    adapters = [write_random_adapter(tmp / f"a{i}", config, r=p["rank"], seed=i,
                                     target_modules=_targets(p["targets"]))
                for i in range(p["adapters"])]
    prompts = prompts_for(p["requests"], p["prompt_len"], config["vocab_size"], seed=0)
    result = {"preset": preset, "device": args.device, "torch": torch.__version__,
              "decode_launch": args.decode_launch,
              "engine_options": ENGINE_OPTIONS,
              "threads": torch.get_num_threads(), "workload": p}
    if args.device == "cuda" and args.profile:
        return profile_decode(str(model), p, load_format, args.profile)
    if args.device == "cuda":
        result.update(gpu_runs(str(model), adapters, prompts, p, load_format, config, args))
    else:
        result["lorry_mixed"] = bench_lorry(str(model), adapters, prompts, p, args.device,
                                            load_format)
        result.update(bench_hf(str(model), adapters, prompts, p, args.device, False))
        result["lorry_vs_peft_mixed"] = round(result["lorry_mixed"]["tok_per_s"]
                                              / result["peft_mixed"]["tok_per_s"], 2)
        result["lorry_vs_hf_base"] = round(result["lorry_mixed"]["tok_per_s"]
                                           / result["hf_base"]["tok_per_s"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def gpu_runs(model: str, adapters, prompts, p: dict, load_format: str, config: dict, args) -> dict:
    """Every Lorry variant of the GPU preset, the HF/PEFT baselines (capped) and the roofline."""
    import gc

    import torch

    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}

    def attempt(name, fn):  # one failing variant must not lose the others' figures
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 (reported in the JSON)
            import traceback

            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    eng = _engine(model, p, "cuda", load_format, len(adapters))
    attempt("lorry_base", lambda: run_lorry(eng, adapters, 0, prompts, p, "cuda"))
    for k in (len(adapters),) if args.quick else (len(adapters), 1, 8):
        attempt("lorry_mixed" if k == len(adapters) else f"lorry_{k}",
                lambda k=k: run_lorry(eng, adapters, k, prompts, p, "cuda"))
    # the machine is shared and noisy: base only and mixed once more, in the other order
    attempt("lorry_mixed_again", lambda: run_lorry(eng, adapters, len(adapters), prompts, p,
                                                   "cuda"))
    attempt("lorry_base_again", lambda: run_lorry(eng, adapters, 0, prompts, p, "cuda"))
    attempt("adapter_swap", lambda: adapter_swap_ms(eng, adapters, "cuda"))
    attempt("cold_adapter_overlap", lambda: cold_load_overlap(eng, adapters, prompts, p))
    attempt("graph_replay_ms", lambda: replay_ms(eng.runner.graphs))
    attempt("graph_replay_mixed_ms", lambda: replay_mixed_ms(eng, p, len(adapters)))
    attempt("lora_layout_kernel_us", lambda: lora_layout_kernel_us(eng))
    graphs, eng.runner.graphs = eng.runner.graphs, None  # the same engine without CUDA graphs
    if not args.quick:
        attempt("lorry_mixed_eager", lambda: run_lorry(eng, adapters, len(adapters),
                                                       prompts[:p["batch"]],
                                                       {**p, "new_tokens": 32}, "cuda"))
    res["graph_captures"] = graphs.captures if graphs else 0
    eng = graphs = None
    gc.collect()
    torch.cuda.empty_cache()
    for k in args.more_adapters:
        def more(k=k):
            e = _engine(model, p, "cuda", load_format, k)
            try:
                return run_lorry(e, adapters, k, prompts, p, "cuda")
            finally:
                del e
                gc.collect()
                torch.cuda.empty_cache()
        attempt(f"lorry_{k}", more)
    res["roofline"] = roofline(config, p, p["rank"], len(adapters))

    def mean(*names):  # tok/s over the runs of those names that produced a figure
        v = [res[n]["tok_per_s"] for n in names if "tok_per_s" in res.get(n, {})]
        return sum(v) / len(v)
    if "tok_per_s" in res["lorry_mixed"] and "tok_per_s" in res["lorry_base"]:
        res["lora_overhead_mixed"] = round(1 - res["lorry_mixed"]["tok_per_s"]
                                           / res["lorry_base"]["tok_per_s"], 4)
        res["lorry_mixed_vs_roofline"] = round(res["lorry_mixed"]["tok_per_s"]
                                               / res["roofline"]["tok_per_s"], 3)
        # both runs of each: the overhead and ratios of the means
        res["lora_overhead_mixed_mean_of_2"] = round(
            1 - mean("lorry_mixed", "lorry_mixed_again") / mean("lorry_base", "lorry_base_again"),
            4)
    if args.baselines:
        caps = {"base_requests": p["batch"], "base_tokens": 32, "peft_requests": p["batch"],
                "peft_tokens": 8, "per_adapter_groups": 8}
        res["hf_caps"] = caps
        attempt("hf", lambda: bench_hf(model, adapters, prompts, p, "cuda",
                                       load_format == "dummy", caps))
        res.update(res.pop("hf"))
        if "peft_mixed" not in res or "tok_per_s" not in res.get("lorry_mixed", {}):
            return res
        res["lorry_vs_peft_mixed"] = round(res["lorry_mixed"]["tok_per_s"]
                                           / res["peft_mixed"]["tok_per_s"], 1)
        res["lorry_vs_peft_mixed_mean_of_2"] = round(
            mean("lorry_mixed", "lorry_mixed_again") / res["peft_mixed"]["tok_per_s"], 1)
        res["lorry_vs_hf_base"] = round(res["lorry_mixed"]["tok_per_s"]
                                        / res["hf_base"]["tok_per_s"], 1)
    if args.plot:
        attempt("plot", lambda: plot(res, args.plot))
    return res


def plot(res: dict, path: str) -> None:
    """tokens/s against the number of adapters, Lorry vs PEFT mixed (matplotlib, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(prefix, full):
        pts = {int(k.rsplit("_", 1)[1]): v["tok_per_s"] for k, v in res.items()
               if k.startswith(prefix + "_") and k.rsplit("_", 1)[1].isdigit()
               and isinstance(v, dict) and "tok_per_s" in v}
        if full in res:
            pts[res[full].get("adapters", 32)] = res[full]["tok_per_s"]
        return sorted(pts.items())
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in (("Lorry (CUDA graphs, Triton LoRA)", series("lorry", "lorry_mixed")),
                       ("HF + PEFT mixed (adapter_names)", series("peft_mixed", "peft_mixed"))):
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    if "lorry_base" in res:
        ax.axhline(res["lorry_base"]["tok_per_s"], ls="--", c="gray", label="Lorry base only")
    ax.set(xscale="log", yscale="log", xlabel="distinct adapters in the workload",
           ylabel="generated tokens/s", title="H200, Llama-3-8B shapes bf16, batch 64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _targets(t) -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if t == "all-linear" else list(t)


if __name__ == "__main__":
    main()
