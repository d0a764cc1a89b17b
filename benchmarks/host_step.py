"""The host's own time per engine step at the bulk workload's shapes, on any machine (JSON).

The bulk workload (benchmarks/bulk.py: prompts of 50-4,000 tokens, 256 rows, 8,192 tokens a
step) through a one-layer tiny Llama on the CPU whose forward is replaced by zeros of the
logits' shape: what is timed is the engine's Python around the model (scheduling, LoRA slot
choice, the step's input tensors, sampling, outputs), which on the GPU runs while the GPU
waits between steps (``prefill_step.py --loop``). Prints ms per step (after ``--skip``
steps, over ``--steps``) and, with ``--profile``, the functions taking most of it.

    PYTHONPATH=. python benchmarks/host_step.py [--skip 40] [--steps 30] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bulk

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.testing import make_tiny_llama, write_random_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    spec = dict(bulk.SPECS["gpu"])
    ap.add_argument("--requests", type=int, default=spec["requests"])
    ap.add_argument("--adapters", type=int, default=spec["adapters"],
                    help="distinct adapters, of the bulk workload's ranks (8-64)")
    ap.add_argument("--slots", type=int, default=spec["slots"], help="max_loras")
    ap.add_argument("--memory-slots", type=int, default=spec["memory_slots"],
                    help="lora_memory_slots (rank-64 slots' worth of rows; 0: max_loras whole "
                         "slots)")
    ap.add_argument("--skip", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorry-host-") as tmp:
        root = Path(tmp)
        model = make_tiny_llama(root / "m", num_layers=1, hidden_size=32, num_heads=2,
                                num_kv_heads=1, intermediate_size=32,
                                max_position_embeddings=8192)
        config = json.loads((model / "config.json").read_text())
        work = bulk.make_workload(spec, args.requests, config["vocab_size"], 0)
        ranks = bulk.adapter_ranks(dict(spec, adapters=args.adapters), 0)
        loras = [LoRARequest(f"a{i}", i + 1, str(write_random_adapter(
            root / f"a{i}", config, r=r, seed=i, target_modules=bulk.TARGETS)))
            for i, r in enumerate(ranks)]
        eng = LLMEngine(EngineConfig(
            model=str(model), device="cpu", max_num_seqs=spec["max_num_seqs"],
            max_model_len=spec["max_model_len"], max_loras=args.slots,
            max_lora_rank=spec["max_lora_rank"], max_cpu_loras=max(args.adapters, args.slots),
            lora_memory_slots=args.memory_slots or None,
            num_kv_blocks=20000, max_num_batched_tokens=8192, enable_prefix_caching=True))
        vocab = config["vocab_size"]

        def zeros(ids, batch, last=None, *a, **kw):
            rows = last.shape[0] if last is not None else ids.shape[0]
            if getattr(batch, "decode", None) is not None:
                rows += batch.decode.positions.shape[0]
            return torch.zeros(rows, vocab)

        eng.runner.model.forward = zeros
        for i, (p, m, a) in enumerate(zip(work.prompts, work.max_tokens, work.adapter)):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=m, temperature=0.0,
                                                       ignore_eos=True),
                            loras[a % args.adapters])
        for _ in range(args.skip):
            eng.step()
        rows = len(eng.scheduler.running)
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        for _ in range(args.steps):
            eng.step()
        if prof:
            prof.disable()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        res = {"benchmark": "host_step", "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "rows_running": rows, "steps": args.steps,
               "adapters": args.adapters, "slots": args.slots,
               "memory_slots": args.memory_slots,
               "host_ms_per_step": round(ms, 3), "profiled": bool(prof)}
        if prof:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
            res["profile"] = out.getvalue().splitlines()[-32:]
        eng.loras.close()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
