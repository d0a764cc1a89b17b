"""Time the CPU torch backend's LoRA ops (kernels/dense_ops.py) at small-model shapes (JSON).

The CPU engine (the demo, CPU workers, the tests) takes these ops for every LoRA layer. This
times one ``add_lora`` call (q/k/v widths of the demo model's shapes, every token's adapter
drawn at random, some tokens without one), single-threaded, median of rounds of 50 calls,
at a few token counts. Run it at two commits for an A/B (`git worktree`).

    PYTHONPATH=. python benchmarks/cpu_lora_ops.py [--tokens 8 64 512] [--rounds 9]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorry.kernels import dense_ops
from lorry.kernels.segments import build_lora_meta

HIDDEN, WIDTHS = 576, [576, 192, 192]     # SmolLM2-135M's q/k/v


def time_add_lora(T: int, adapters: int, rank: int, rounds: int, calls: int = 50) -> float:
    """Median microseconds of one add_lora call over ``rounds`` rounds of ``calls``."""
    g = torch.Generator().manual_seed(T)
    a = [torch.randn(adapters, rank, HIDDEN, generator=g) for _ in WIDTHS]
    b = [torch.randn(adapters, n, rank, generator=g) for n in WIDTHS]
    x = torch.randn(T, HIDDEN, generator=g)
    offsets = [sum(WIDTHS[:i]) for i in range(len(WIDTHS))]
    y = torch.zeros(T, sum(WIDTHS))
    times = []
    for _ in range(rounds):
        meta = build_lora_meta(torch.randint(-1, adapters, (T,), generator=g), adapters)
        t0 = time.perf_counter()
        for _ in range(calls):
            dense_ops.add_lora(y, x, a, b, meta, offsets)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {T: round(time_add_lora(T, args.adapters, args.rank, args.rounds), 1)
            for T in args.tokens}
    print(json.dumps({"benchmark": "cpu_lora_ops", "date": time.strftime("%Y-%m-%d"),
                      "torch": torch.__version__, "adapters": args.adapters, "rank": args.rank,
                      "add_lora_us_by_tokens": rows}))


if __name__ == "__main__":
    main()
