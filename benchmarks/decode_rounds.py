"""Host cost per decode step with and without multi-step rounds (JSON out).

A decode step's host work (scheduling, block tables, reading and adding tokens, stop checks)
does not depend on the model; on a model whose forward is nearly free it is most of the step,
so this shows what ``num_scheduler_steps`` takes off it. ``--model`` runs a real base instead.

    PYTHONPATH=. python benchmarks/decode_rounds.py [--device cuda] [--rows 256]

Each setting runs ``--repeats`` times, alternating, on a fresh engine after an untimed
warm-up; greedy answers of ``--tokens`` tokens (ignore_eos) to ``--rows`` prompts of 16 tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from lorry.engine import EngineConfig, LLMEngine, SamplingParams
from lorry.testing import make_tiny_llama


def run(model: str, args, steps: int) -> dict:
    eng = LLMEngine(EngineConfig(model=model, device=args.device, enable_lora=False,
                                 max_num_seqs=args.rows, max_model_len=16 + args.tokens + 8,
                                 num_scheduler_steps=steps, max_num_batched_tokens=8192,
                                 load_format=args.load_format))
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 200) for _ in range(16)] for _ in range(args.rows)]
    eng.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                         ignore_eos=True), use_tqdm=False)      # warm-up
    before = dict(eng.cache_stats()["steps"]["decode"])
    t0 = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                                ignore_eos=True), use_tqdm=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    d = eng.cache_stats()["steps"]["decode"]
    # tokens/s of the whole generate: the engine's per-step seconds start after scheduling
    # and end before the tokens are added, so they leave out most of the host work
    return {"tok_per_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / seconds, 1),
            "decode_steps": d["steps"] - before["steps"], "rounds": d["rounds"] - before["rounds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="a base model dir (default: a tiny Llama)")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights for --model")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8],
                    help="num_scheduler_steps settings to compare")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = args.model or str(make_tiny_llama(tempfile.mkdtemp() + "/m", hidden_size=32,
                                              num_layers=1))
    runs: dict[int, list] = {k: [] for k in args.steps}
    for _ in range(args.repeats):
        for k in args.steps:
            runs[k].append(run(model, args, k))
    res = {"benchmark": "decode_rounds", "device": args.device, "model": args.model or "tiny",
           "rows": args.rows, "tokens": args.tokens, "date": time.strftime("%Y-%m-%d"),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "runs": {str(k): v for k, v in runs.items()},
           "median_tok_per_s": {str(k): statistics.median(r["tok_per_s"] for r in v)
                                for k, v in runs.items()}}
    base = res["median_tok_per_s"].get(str(args.steps[0]))
    res["speedup_over_first"] = {k: round(v / base, 3) for k, v in
                                 res["median_tok_per_s"].items()} if base else None
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
