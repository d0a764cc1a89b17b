"""The LoRA of real bulk-workload steps, kernel by kernel setting (JSON lines out).

A step of ``benchmarks/bulk.py``'s schedule (replayed with ``schedule_replay.py``: its rows,
each row's adapter, and where the engine's slot memory placed each adapter) is rebuilt as one
q/k/v and one o ``add_lora`` call over row buffers (Llama-3-8B widths, bf16, ranks 8-64 as the
workload draws them), and each call is timed in a CUDA graph per decode-table setting
(kernels/configs/, ``lora_kernels.py --decode-config`` syntax; ``prompt.key=value`` items set
the two-launch kernels' "prompt" table). Successive calls rotate over
copies of the row buffers, as successive layers read their own. Printed per setting: time a
call, the adapters' A and B bytes it must read (each resident adapter of the step once, to
its rank, rounded up to 16 rows as the kernels read them) and the bandwidth that makes, the
same with the kernels' m-tiles counted (each tile reads its adapter's weights again), and the
step's LoRA in all 32 layers. Settings that leave a call on the two-launch path (every
setting of the decode table, for a prompt step past its max_tokens) are timed once.

    PYTHONPATH=. python benchmarks/lora_bulk_step.py [--slot-ids 96] [--decode-at 600]
        [--configs default rows=8 rows=16 off | --sweep | --prompt-sweep | --crossing]
        [--max-seconds 400]
        [--describe] [--check]

``--describe`` runs anywhere (the steps only); ``--check`` runs each setting at a small width
against the torch backend (on the CPU under ``TRITON_INTERPRET=1``).

Why: with 96 adapter ids sharing 32 rank-64 slots' memory a bulk decode step has ~62
adapters whose ranks sum to ~1,780 and whose A and B the kernels read in ~1,920 rows
(``schedule_replay.py``), ~3.3 GB a step (~1.0 ms at an H100's 3.35 TB/s), where the
whole-engine runs show ~4.2 ms of LoRA a decode step (docs/BENCHMARKS.md). The decode
table was tuned on uniform batches of 32 rank-16 adapters that stay in L2; this times the
shapes the bulk workload has.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorry.kernels.segments import SlotRows, build_lora_meta

PROJECTIONS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096])}
LAYERS = 32
ROTATE_BYTES = 240e6    # more than the L2 of an H100 or H200 (50-60 MB)


def pick_steps(slot_ids: int = 96, memory_slots: int = 32, at: dict | None = None,
               requests: int = 2000, seed: int = 0) -> dict:
    """The first decode-only step at or after step ``at["decode"]`` of the bulk schedule
    (longest answers first, as generate submits it), and the first prompt-bearing one at or
    after ``at["prompt"]`` (default 600 and 150): per kind, ``tokens``
    [(slot, tokens of that row)] in step order, ``slots`` {slot: (first row, rank)},
    ``memory_rows``, ``max_loras``, ``step``."""
    import bulk
    import schedule_replay
    from throughput import LLAMA3_8B

    spec = dict(bulk.SPECS["gpu"])
    w = bulk.make_workload(spec, requests, LLAMA3_8B["vocab_size"], seed)
    ranks = bulk.adapter_ranks(spec, seed)
    rank_of = {a + 1: r for a, r in enumerate(ranks)}
    found: dict = {}
    at = {"decode": 600, "prompt": 150, **(at or {})}

    def on_step(n, plan, mem):
        kind = "prompt" if plan.prefill else "decode"
        if n >= at[kind] and kind not in found:
            chunks = list(plan.chunks) + [1] * (len(plan.seqs) - len(plan.chunks))
            toks = [(mem.lookup(s.lora_id), c) for s, c in zip(plan.seqs, chunks)]
            slots = {}
            for slot, _ in toks:
                first, _pages = mem.block_of[slot]
                lid = mem.owners()[slot]
                slots[slot] = (first * mem.page, mem.rank_of[lid])
            found[kind] = {"step": n, "tokens": toks, "slots": slots,
                           "memory_rows": mem.num_rows, "max_loras": mem.capacity,
                           "max_rank": mem.max_rank}
        return len(found) == 2

    done = schedule_replay.replay(w, spec["max_num_seqs"], memory_slots, 8, 8192, 20926, 16,
                                  order="longest_first", rank_of=rank_of, slot_ids=slot_ids,
                                  on_step=on_step)
    missing = sorted(set(at) - set(found))
    if missing:
        raise SystemExit(f"no {' or '.join(missing)} step at or after step "
                         f"{', '.join(str(at[k]) for k in missing)}: the schedule has "
                         f"{done['steps']} steps")
    return found


def synthetic_prompt(adapters: int, tokens: int = 4096, rank: int = 64, slot_ids: int = 96,
                     memory_slots: int = 32) -> dict:
    """A prompt step of ``tokens`` split evenly over ``adapters`` adapters of ``rank`` (as
    pick_steps gives a step): where the decode path's long tiles and the two-launch kernels
    cross (--crossing)."""
    if adapters * rank > memory_slots * 64:
        raise SystemExit(f"{adapters} adapters of rank {rank} do not fit {memory_slots} slots")
    per = tokens // adapters
    return {"step": f"synthetic: {adapters} x {per} tokens, rank {rank}",
            "tokens": [(s, per) for s in range(adapters)],
            "slots": {s: (s * rank, rank) for s in range(adapters)},
            "memory_rows": memory_slots * 64, "max_loras": slot_ids, "max_rank": 64}


CROSSING_ADAPTERS = (1, 2, 4, 8, 16, 32)
# the shipped table, the two-launch kernels (as shipped, and with the shrink settings that
# were best at the bulk prompt step), and the decode path's long tiles at any length
CROSSING_CONFIGS = ["default", "off", "off,prompt.shrink_num_stages=4",
                    "off,prompt.shrink_num_stages=4,prompt.shrink_block_k=128",
                    "long.max_rows_per_slot=100000"]


def weight_rows(comp: dict, tile_rows: int | None = None, exact: bool = False) -> int:
    """Rows of A and B the step's LoRA reads: each adapter's rank rounded up to 16 (the
    row-buffer kernels read whole 16-row groups; ``exact``: the rank itself), once, or
    (``tile_rows``) once per m-tile of up to that many of its tokens, as the kernels' tiles
    (kernels.segments.tile_table, and the two-launch kernels' BLOCK_M) read them."""
    per_slot: dict = {}
    for slot, n in comp["tokens"]:
        per_slot[slot] = per_slot.get(slot, 0) + n
    from schedule_replay import rows_read

    rank = {slot: r if exact else rows_read(r) for slot, (_, r) in comp["slots"].items()}
    if tile_rows is None:
        return sum(rank[s] for s in per_slot)
    return sum(rank[s] * -(-n // tile_rows) for s, n in per_slot.items())


def tile_rows_of(comp: dict, plan: dict | None, device="cpu") -> int:
    """Tokens a tile holds on the path a call takes: the decode plan's rows, else the
    two-launch kernels' BLOCK_M."""
    from lorry.kernels import triton_lora

    if plan is not None:
        return plan["rows"]
    return triton_lora.prompt_plan(sum(n for _, n in comp["tokens"]), comp["max_loras"],
                                   4096, torch.device(device))["block_m"]


def step_problem(comp: dict, hidden: int, widths: list[int], dtype, device, sets: int = 1,
                 seed: int = 0):
    """One add_lora call's inputs for the step ``comp``: (offsets, meta, x [T, hidden],
    y [T, sum(widths)], ``sets`` copies of (A row buffers [rows, hidden], B [N_s, rows])).
    Rows no step adapter owns, and an adapter's rows past its rank, are zero."""
    gen = torch.Generator().manual_seed(seed)
    rows, L = comp["memory_rows"], comp["max_loras"]
    token_slots = [slot for slot, n in comp["tokens"] for _ in range(n)]
    random.Random(seed).shuffle(token_slots)     # rows arrive in no slot order
    table = torch.zeros(2, L, dtype=torch.int32)
    for slot, (first, rank) in comp["slots"].items():
        table[0, slot], table[1, slot] = first, rank
    # the host hint the engine's runner gives an eager step: adapter tokens a slot
    adapted = [t for t in token_slots if t >= 0]
    meta = build_lora_meta(torch.tensor(token_slots, dtype=torch.int32, device=device), L,
                           SlotRows(table.to(device), comp["max_rank"], row_align=16),
                           len(adapted) // max(1, len(set(adapted))))
    owned = torch.zeros(rows, dtype=torch.bool)
    for first, rank in comp["slots"].values():
        owned[first:first + rank] = True

    def buffers():
        a = [torch.randn(rows, hidden, generator=gen) * 0.02 * owned[:, None] for _ in widths]
        b = [torch.randn(n, rows, generator=gen) * 0.02 * owned[None, :] for n in widths]
        return ([t.to(device, dtype) for t in a], [t.to(device, dtype) for t in b])

    T = len(token_slots)
    x = (torch.randn(T, hidden, generator=gen)).to(device, dtype)
    y = torch.randn(T, sum(widths), generator=gen).to(device, dtype)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    return offsets, meta, x, y, [buffers() for _ in range(sets)]


# --sweep: the decode table's launch settings over the bulk decode step's shape
SWEEP = {"rows": (4, 8, 16), "programs_per_sm": (3, 6), "shrink_programs_per_sm": (12, 24),
         "num_warps": (4, 8)}


def sweep_configs() -> list[str]:
    """'default', 'off' and every combination of SWEEP as 'key=value,...'."""
    keys = list(SWEEP)
    return ["default", "off"] + [",".join(f"{k}={v}" for k, v in zip(keys, values))
                                 for values in itertools.product(*SWEEP.values())]


# --prompt-sweep: the prompt step's settings, one at a time and in a few combinations: the
# two-launch kernels' "prompt" table (split of the shrink's reduction, its k tile, stages and
# warps, taller m-tiles, the expand's column tile), and the decode path's "long" entries (up
# to 8,192 tokens and rank 64, tiles of 16-64 tokens; "default" is the shipped 16)
# two-launch settings go with "off" (the decode path closed, its long entries included)
_TWO = ["shrink_programs_per_sm=8", "shrink_programs_per_sm=16", "shrink_programs_per_sm=32",
        "shrink_block_k=128", "shrink_block_k=256", "shrink_num_stages=3", "shrink_num_stages=4",
        "shrink_num_warps=8", "max_block_m=128", "block_m=32", "expand_block_n=128",
        "expand_block_n=256", "expand_num_warps=8", "expand_num_stages=3",
        "shrink_programs_per_sm=16,shrink_block_k=128,shrink_num_stages=3",
        "shrink_num_stages=4,shrink_block_k=128",
        "shrink_programs_per_sm=16,max_block_m=128,expand_block_n=128"]
_OPEN_LONG = "long.max_tokens=8192,long.max_rank=64"
PROMPT_SWEEP = (
    ["default", "off"]
    + ["off," + ",".join("prompt." + kv for kv in t.split(",")) for t in _TWO]
    + [_OPEN_LONG + ",long.rows=32", _OPEN_LONG + ",long.rows=64",
       _OPEN_LONG + ",long.rows=32,long.programs_per_sm=6"])


def split_spec(spec: str, device: str = "cuda") -> tuple[dict, dict | None]:
    """A setting -> (the decode table, the two-launch "prompt" table or None for the
    device's): 'prompt.key=value' items set the latter, the rest is lora_kernels'
    --decode-config syntax ('default', 'off', 'key=value', 'long.key=value', ...)."""
    import lora_kernels
    from lorry.kernels import tuning

    items = spec.split(",")
    bad = [i for i in items if i.startswith("prompt.") and "=" not in i]
    if bad:
        raise SystemExit(f"prompt table items are prompt.key=value, got {bad}")
    prompt = [i.split("=", 1) for i in items if i.startswith("prompt.")]
    rest = [i for i in items if not i.startswith("prompt.") and i != "off"]
    decode = lora_kernels.parse_decode_config(",".join(rest) or "default", device)
    if "off" in items:
        decode["max_tokens"] = 0
    if not prompt:
        return decode, None
    table = dict(tuning.for_device(torch.device(device))["prompt"])
    for key, value in prompt:
        key = key.removeprefix("prompt.")
        if key not in table:
            raise SystemExit(f"unknown prompt table key {key!r}; keys: {sorted(table)}")
        table[key] = int(value)
    return decode, table


def time_step(comp: dict, proj: str, configs: list[str], deadline: float = math.inf) -> list[dict]:
    """One JSON row per decode-table setting: the step's add_lora for ``proj`` (settings
    left when ``deadline``, a time.time(), passes are not timed)."""
    import lora_kernels
    from lorry.kernels import lora_decode, triton_lora
    from lorry.kernels.backends import get_lora_ops

    H, widths = PROJECTIONS[proj]
    per_row = (H * len(widths) + sum(widths)) * 2            # A and B bytes of one rank row
    read = weight_rows(comp) * per_row                       # each adapter once
    sets = max(2, min(16, math.ceil(ROTATE_BYTES / max(1, read))))
    offsets, meta, x, y, weights = step_problem(comp, H, widths, torch.bfloat16, "cuda", sets)
    tri = get_lora_ops("triton")
    T = x.shape[0]
    out, two_launch = [], {}
    saved = lora_decode.DECODE_CONFIG, triton_lora.PROMPT_CONFIG
    try:
        for spec in configs:
            if time.time() > deadline:
                break
            cfg, prompt = split_spec(spec)
            lora_decode.DECODE_CONFIG, triton_lora.PROMPT_CONFIG = cfg, prompt
            plan = lora_decode.decode_plan(T, meta.max_loras, H, comp["max_rank"], widths,
                                           x.device, cfg, meta.tokens_per_slot)
            key = json.dumps(prompt, sort_keys=True)
            if plan is None and key in two_launch:
                # the decode table does not reach the two-launch path: timed once a table
                out.append(dict(two_launch[key], config=spec, same_as=two_launch[key]["config"]))
                continue
            us = lora_kernels._graph_time_us(
                [lambda a=a, b=b: tri.add_lora(y, x, a, b, meta, offsets) for a, b in weights],
                reps=20)
            rows = tile_rows_of(comp, plan, "cuda")
            tiles = weight_rows(comp, rows) * per_row
            io = (T * H + 2 * T * sum(widths)) * 2                # x read, y read and written
            out.append({"proj": proj, "config": spec, "tokens": T, "sets": sets,
                        "path": "decode" if plan else "two_launch", "tile_rows": rows,
                        "us": round(us, 2), "weights_MB": round(read / 1e6, 1),
                        "weights_GBps": round(read / us / 1e3, 1),
                        "tile_reads_MB": round(tiles / 1e6, 1),
                        "all_bytes_GBps": round((tiles + io) / us / 1e3, 1)})
            if plan is None:
                two_launch[key] = out[-1]
    finally:
        lora_decode.DECODE_CONFIG, triton_lora.PROMPT_CONFIG = saved
    return out


def check_step(comp: dict, configs: list[str], device) -> list[dict]:
    """The step's q/k/v add_lora at a small width (hidden 64) through the Triton backend per
    setting against the torch backend (fp32): what is timed computes the right thing. On the
    CPU run it under TRITON_INTERPRET=1. The decode path is forced where it would not apply
    at this width (min_expand_cols 0)."""
    from lorry.kernels import lora_decode, triton_lora
    from lorry.kernels.backends import get_lora_ops

    widths = [64, 16, 16]
    offsets, meta, x, y, [(a, b)] = step_problem(comp, 64, widths, torch.float32, device)
    ref = y.clone()
    get_lora_ops("torch").add_lora(ref, x, a, b, meta, offsets)
    out, saved = [], (lora_decode.DECODE_CONFIG, triton_lora.PROMPT_CONFIG)
    try:
        for spec in configs:
            cfg, prompt = split_spec(spec, device)
            if cfg["max_tokens"]:
                cfg["min_expand_cols"] = 0
            lora_decode.DECODE_CONFIG, triton_lora.PROMPT_CONFIG = cfg, prompt
            plan = lora_decode.decode_plan(x.shape[0], meta.max_loras, 64, comp["max_rank"],
                                           widths, x.device, cfg, meta.tokens_per_slot)
            got = y.clone()
            get_lora_ops("triton").add_lora(got, x, a, b, meta, offsets)
            out.append({"config": spec, "path": "decode" if plan else "two_launch",
                        "max_abs_error": (got - ref).abs().max().item(),
                        "lora_max_abs": (ref - y).abs().max().item()})
    finally:
        lora_decode.DECODE_CONFIG, triton_lora.PROMPT_CONFIG = saved
    return out


def describe(comp: dict) -> dict:
    per_slot: dict = {}
    for slot, n in comp["tokens"]:
        per_slot[slot] = per_slot.get(slot, 0) + n
    counts = sorted(per_slot.values(), reverse=True)
    from lorry.kernels import triton_lora

    block_m = triton_lora.prompt_plan(sum(counts), comp["max_loras"], 4096,
                                      torch.device("cpu"))["block_m"]
    return {"step": comp["step"], "rows": len(comp["tokens"]), "tokens": sum(counts),
            "adapters": len(per_slot), "rank_sum": weight_rows(comp, exact=True),
            "rows_read": weight_rows(comp),
            "tokens_per_adapter_top": counts[:8],
            "adapters_with_one_token": sum(1 for c in counts if c == 1),
            # rows read again by each tile of the decode path (tiles of 4, 8, 16 tokens) and
            # of the two-launch kernels (BLOCK_M tokens)
            "rows_read_in_tiles_of": {r: weight_rows(comp, r) for r in (4, 8, 16)},
            "two_launch_block_m": block_m,
            "rows_read_in_two_launch_tiles": weight_rows(comp, block_m)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slot-ids", type=int, default=96,
                    help="resident adapters (max_loras) sharing the memory (bulk's default)")
    ap.add_argument("--memory-slots", type=int, default=32)
    ap.add_argument("--decode-at", type=int, default=600,
                    help="time the first decode-only step from this step on")
    ap.add_argument("--prompt-at", type=int, default=150,
                    help="time the first prompt-bearing step from this step on")
    ap.add_argument("--configs", nargs="+", default=["default", "rows=8", "rows=16", "off"],
                    help="decode-table settings (lora_kernels.py --decode-config syntax)")
    ap.add_argument("--kinds", nargs="+", choices=["decode", "prompt"],
                    default=["decode", "prompt"])
    ap.add_argument("--sweep", action="store_true",
                    help="time 'default', 'off' and every combination of SWEEP instead of "
                         "--configs (decode steps; the prompt step takes the two-launch path)")
    ap.add_argument("--prompt-sweep", action="store_true",
                    help="time PROMPT_SWEEP's settings instead of --configs (the prompt step "
                         "only)")
    ap.add_argument("--crossing", action="store_true",
                    help="time 4,096-token prompt steps of 1-32 rank-64 adapters on the shipped "
                         "table, the two-launch kernels and the long tiles (CROSSING_*) instead")
    ap.add_argument("--max-seconds", type=float, default=math.inf,
                    help="stop timing settings after this long (the best so far is printed)")
    ap.add_argument("--describe", action="store_true",
                    help="only describe the steps (no GPU needed)")
    ap.add_argument("--check", action="store_true",
                    help="only check each setting against the torch backend at a small width "
                         "(on the CPU: with TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.sweep:
        args.configs = sweep_configs()
    if args.prompt_sweep:
        args.configs, args.kinds = PROMPT_SWEEP, ["prompt"]
    deadline = time.time() + args.max_seconds
    if args.crossing:
        steps = {f"prompt_{k}": synthetic_prompt(k, slot_ids=args.slot_ids,
                                                 memory_slots=args.memory_slots)
                 for k in CROSSING_ADAPTERS}
        args.configs, args.kinds = CROSSING_CONFIGS, list(steps)
    else:
        steps = pick_steps(args.slot_ids, args.memory_slots,
                           {"decode": args.decode_at, "prompt": args.prompt_at})
    print(json.dumps({"benchmark": "lora_bulk_step", "date": time.strftime("%Y-%m-%d"),
                      "slot_ids": args.slot_ids, "memory_slots": args.memory_slots,
                      "steps": {k: describe(steps[k]) for k in args.kinds}}), flush=True)
    if args.describe:
        return
    if args.check:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for kind in args.kinds:
            for row in check_step(steps[kind], args.configs, device):
                print(json.dumps({"kind": kind, "check": True, **row}), flush=True)
        return
    if not torch.cuda.is_available():
        print(json.dumps({"error": "timing needs a CUDA GPU (--describe runs anywhere)"}))
        sys.exit(1)
    print(json.dumps({"device": torch.cuda.get_device_name(),
                      "triton": __import__("triton").__version__}), flush=True)
    for kind in args.kinds:
        total: dict = {}
        for proj in PROJECTIONS:
            for row in time_step(steps[kind], proj, args.configs, deadline):
                print(json.dumps({"kind": kind, **row}), flush=True)
                total.setdefault(row["config"], {})[proj] = row["us"]
        # the step's LoRA over every layer (q/k/v and o each layer), settings timed for both
        ms = {k: round(sum(v.values()) * LAYERS / 1e3, 3) for k, v in total.items()
              if len(v) == len(PROJECTIONS)}
        best = min(ms, key=ms.get) if ms else None
        print(json.dumps({"kind": kind, "step_lora_ms": ms, "best": best,
                          "default_over_best": round(ms["default"] / ms[best], 3)
                          if best and "default" in ms else None}), flush=True)


if __name__ == "__main__":
    main()
