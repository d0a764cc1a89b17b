"""Where the GPU waits in a torch.profiler Chrome trace (JSON out): busy and idle time over
the kernels' span, the idle time split by gap size, and the largest gaps, each with the host
operator (and the innermost Lorry Python frame, when the trace has stacks) that launched the
kernel after it: what the host was doing while the GPU waited.

    python benchmarks/trace_gaps.py TRACE.json [--top 15] [--min-gap-us 20]

``prefill_step.py --trace`` writes such traces (with Python stacks).
"""
from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from pathlib import Path


def _innermost(spans: list[tuple[float, float, str]], starts: list[float], t: float) -> str:
    """The shortest span of ``spans`` (sorted by start) that contains time ``t``."""
    best, best_len = "", float("inf")
    i = bisect.bisect_right(starts, t)
    # spans nest, so walking back from the last one starting before t finds the enclosing ones
    for a, b, name in reversed(spans[max(0, i - 4000):i]):
        if a <= t <= b and b - a < best_len:
            best, best_len = name, b - a
    return best


def analyse(events: list[dict], top: int, min_gap_us: float) -> dict:
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in
                      ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not kernels:
        return {"error": "no kernels in the trace"}
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") == "cuda_runtime"
                and "correlation" in e.get("args", {})}
    ops = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                  if e.get("cat") == "cpu_op" and e.get("ph") == "X"))
    frames = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "python_function" and e.get("ph") == "X"
                     and any(p in e["name"] for p in ("lorry/", "engine/", "kernels/"))))
    op_starts, frame_starts = [o[0] for o in ops], [f[0] for f in frames]
    span0, end = kernels[0]["ts"], kernels[0]["ts"] + kernels[0]["dur"]
    busy, gaps = kernels[0]["dur"], []
    for k in kernels[1:]:
        a, b = k["ts"], k["ts"] + k["dur"]
        if a > end:
            gaps.append((a - end, k))
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = end - span0
    by_size = defaultdict(float)
    for g, _ in gaps:
        by_size["<5us" if g < 5 else "5-20us" if g < 20 else "20-100us" if g < 100
                else "100us-1ms" if g < 1000 else ">=1ms"] += g
    by_where: dict = defaultdict(lambda: [0.0, 0])
    largest = []
    for g, k in sorted(gaps, key=lambda x: -x[0]):
        if g < min_gap_us:
            break
        launch = launches.get(k.get("args", {}).get("correlation"))
        t = launch["ts"] if launch else k["ts"]
        op = _innermost(ops, op_starts, t)
        frame = _innermost(frames, frame_starts, t) if frames else ""
        key = frame or op
        by_where[key][0] += g
        by_where[key][1] += 1
        if len(largest) < top:
            largest.append({"gap_us": round(g, 1), "next_kernel": k["name"][:90],
                            "launched_in_op": op[:90], "frame": frame[:120]})
    return {"kernels": len(kernels), "span_ms": round(span / 1e3, 3),
            "busy_ms": round(busy / 1e3, 3), "idle_ms": round((span - busy) / 1e3, 3),
            "idle_share": round(1 - busy / span, 3),
            "idle_ms_by_gap_size": {k: round(v / 1e3, 3) for k, v in sorted(by_size.items())},
            f"idle_ms_by_launch_site_gaps_over_{min_gap_us:g}us": [
                {"where": w[:140], "ms": round(v[0] / 1e3, 3), "gaps": v[1]}
                for w, v in sorted(by_where.items(), key=lambda x: -x[1][0])[:top]],
            "largest_gaps": largest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    args = ap.parse_args()
    data = json.loads(Path(args.trace).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    print(json.dumps(analyse(events, args.top, args.min_gap_us), indent=2))


if __name__ == "__main__":
    main()
