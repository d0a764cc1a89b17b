"""What pinned host allocations cost the thread that launches kernels (JSON; CUDA only).

A cold adapter load stages its weights in one pinned (page-locked) host buffer of 14-110 MB
for Llama-3-8B shapes (engine.lora.slot_layout.SlotLayout.stage): a ``cudaHostAlloc``, which
page-locks and maps the memory under a driver lock. This measures, per allocator setting,
what such allocations cost a thread beside them that launches small kernels as the engine's
thread does: each setting runs in a process of its own (PYTORCH_CUDA_ALLOC_CONF is read once),
where a loader thread allocates and zero-fills buffers of the given sizes (keeping them, as
the CPU adapter cache does) while the main thread launches kernels; the same launch loop alone
first is the baseline. Settings: "default" (cudaHostAlloc), "register" (malloc, then
cudaHostRegister in 8 threads: pinned_use_cuda_host_register), "reserve" (one reserved segment,
pinned_reserve_segment_size_mb, where this torch knows it) and "pageable" (no pinning: what the
allocation costs without the driver).

    PYTHONPATH=. python benchmarks/pinned_alloc.py [--sizes-mb 14 27 55 110] [--count 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

SETTINGS = {
    "default": "",
    "register": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
    "reserve": "pinned_reserve_segment_size_mb:4096",
    "pageable": "",
}


def launch_loop(stop, gaps: list) -> int:
    """Small kernel launches until ``stop``; the time between consecutive launches kept."""
    import torch

    x = torch.zeros(256, device="cuda")
    n, last = 0, time.perf_counter()
    while not stop():
        x.add_(1.0)
        now = time.perf_counter()
        gaps.append(now - last)
        last, n = now, n + 1
    torch.cuda.synchronize()
    return n


def gap_summary(gaps: list, seconds: float, n: int) -> dict:
    big = [g for g in gaps if g > 1e-3]
    return {"launches_per_s": round(n / seconds), "max_gap_ms": round(max(gaps) * 1e3, 2),
            "gaps_over_1ms": len(big), "ms_in_gaps_over_1ms": round(sum(big) * 1e3, 1),
            "p99_gap_us": round(sorted(gaps)[int(0.99 * (len(gaps) - 1))] * 1e6, 1)}


def child(setting: str, sizes_mb: list[int], count: int) -> dict:
    import torch

    torch.zeros(1, device="cuda")   # the context first: its start is not the allocations'
    pin = setting != "pageable"
    torch.empty(1 << 20, dtype=torch.uint8, pin_memory=pin)   # the allocator's own start
    gaps: list = []
    deadline = time.perf_counter() + 1.0
    t0 = time.perf_counter()
    n = launch_loop(lambda: time.perf_counter() > deadline, gaps)
    alone = gap_summary(gaps, time.perf_counter() - t0, n)
    kept, times, done = [], {s: [] for s in sizes_mb}, threading.Event()

    def loader():
        for _ in range(count):
            for s in sizes_mb:
                a = time.perf_counter()
                buf = torch.empty(s << 20, dtype=torch.uint8, pin_memory=pin)
                b = time.perf_counter()
                buf.zero_()
                times[s].append((b - a, time.perf_counter() - b))
                kept.append(buf)
        done.set()

    gaps = []
    th = threading.Thread(target=loader)
    t0 = time.perf_counter()
    th.start()
    n = launch_loop(done.is_set, gaps)
    th.join()
    beside = gap_summary(gaps, time.perf_counter() - t0, n)
    res = {"setting": setting, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
           "pinned": pin and all(b.is_pinned() for b in kept),
           "alloc_ms_median": {s: round(statistics.median(a for a, _ in t) * 1e3, 2)
                               for s, t in times.items()},
           "alloc_ms_max": {s: round(max(a for a, _ in t) * 1e3, 2) for s, t in times.items()},
           "zero_ms_median": {s: round(statistics.median(z for _, z in t) * 1e3, 2)
                              for s, t in times.items()},
           "launch_loop_alone": alone, "launch_loop_beside_allocations": beside}
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is not None and pin:
        st = stats()
        res["host_memory_stats"] = {k: st.get(k) for k in (
            "num_host_alloc", "host_alloc_time.total", "host_alloc_time.max",
            "allocated_bytes.current")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[14, 27, 55, 110])
    ap.add_argument("--count", type=int, default=4, help="buffers of each size")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sizes_mb, args.count)))
        return
    out = {"benchmark": "pinned_alloc", "date": time.strftime("%Y-%m-%d"), "runs": []}
    for setting in args.settings:
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=SETTINGS[setting])
        p = subprocess.run([sys.executable, __file__, "--child", setting, "--count",
                            str(args.count), "--sizes-mb", *map(str, args.sizes_mb)],
                           env=env, capture_output=True, text=True)
        if p.returncode:
            out["runs"].append({"setting": setting, "error": p.stderr.strip()[-600:]})
        else:
            out["runs"].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
