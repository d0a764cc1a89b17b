"""The bulk workload through the scheduler alone: steps and batch size, no model (JSON out).

Replays ``benchmarks/bulk.py``'s seeded workload (2,000 requests, 200 Zipf adapters, 20
templates) through ``engine.scheduler.Scheduler`` and ``engine.kv_cache.BlockManager`` as
the engine would drive them: prompt chunks complete, decode rows gain a token per step (a
round's steps each), rows finish at ``max_tokens``. What it shows is the schedule itself:
how many steps the workload takes and how full they are, for each setting. It runs anywhere
in seconds; the GPU time per step is ``bulk.py``'s to measure.

    PYTHONPATH=. python benchmarks/schedule_replay.py [--max-loras 32 64] [--steps 1 8]

The LoRA slot memory is the engine's own placement (engine.lora.slot_pages, torch-free):
``--max-loras`` slots' memory of rank 64, shared by rank among up to ``--slot-ids`` resident
adapters (EngineConfig.lora_memory_slots and max_loras; default: as many ids as slots, which
is whole slots' schedule). The scheduler's planner admits adapters as the engine's does, and a
step's new adapters are placed largest first as the engine places them (its prefetch of the
next waiters' adapters is not replayed). Each run also prints the floor that whole slots put
on any schedule: every adapter holds a slot for at least its longest answer, so the steps
are at least the sum of those over the slots.

``--cold-load-ms 0 130`` also models time (Clock): each step's cost from a linear fit to an
H100's bulk run, and the adapters the warm-up did not load arriving one by one from the
background loader. The difference between the two runs is what waiting for loads costs the
schedule alone (rows not admitted while their adapter loads), without the loads' cost to the
engine's thread (the GIL, the driver's lock), which only the GPU runs show.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bulk
from throughput import LLAMA3_8B

from lorry.engine import EngineConfig, LoRARequest, SamplingParams
from lorry.engine.llm_engine import GENERATE_ORDERS, longest_first
from lorry.engine.kv_cache import BlockManager
from lorry.engine.lora.slot_pages import SlotPages
from lorry.engine.outputs import RequestMetrics
from lorry.engine.scheduler import Scheduler
from lorry.engine.sequence import Sequence, SequenceStatus


def rows_read(rank: int) -> int:
    """Rows of A and B the row-buffer kernels read for an adapter: its rank rounded up to 16
    (kernels.triton_kernels._slot_place)."""
    return -(-rank // 16) * 16


class Clock:
    """A modelled clock for cold adapter loads: each step advances it by a linear cost (a
    prompt-bearing step: ``prompt_ms`` + ``prompt_token_ms`` a prompt token + ``row_ms`` a
    decoding row; a decode step: ``decode_ms`` + ``row_ms`` a row), and the adapters not in
    ``warm`` load one after another (``loaders`` at a time, ``load_ms`` each) in the order
    their first request was submitted, as the engine's background loader takes them."""

    def __init__(self, load_ms: float, warm: set, loaders: int = 1, prompt_ms: float = 20.0,
                 prompt_token_ms: float = 0.026, decode_ms: float = 12.0,
                 row_ms: float = 0.047, prompt_floor_ms: float = 0.0):
        self.load_ms, self.warm, self.loaders = load_ms, warm, loaders
        self.prompt_ms, self.prompt_token_ms = prompt_ms, prompt_token_ms
        self.decode_ms, self.row_ms = decode_ms, row_ms
        self.prompt_floor_ms = prompt_floor_ms   # the least a prompt-bearing step takes
        self.now, self.idle, self.ready_at = 0.0, 0.0, {}

    def submit(self, seqs) -> None:
        free = [0.0] * self.loaders          # when each loader thread is next free
        for s in seqs:
            lid = s.lora_id
            if lid in self.ready_at:
                continue
            if lid in self.warm or not self.load_ms:
                self.ready_at[lid] = 0.0
                continue
            i = min(range(self.loaders), key=free.__getitem__)
            free[i] += self.load_ms
            self.ready_at[lid] = free[i]

    def ready(self, seq) -> bool:
        return self.ready_at.get(seq.lora_id, 0.0) <= self.now

    def wait(self) -> None:
        """Nothing could run: on to the next load's end (the engine's load_wait)."""
        later = [t for t in self.ready_at.values() if t > self.now]
        if not later:
            raise RuntimeError("the schedule stalled")
        self.idle += min(later) - self.now
        self.now = min(later)

    def step(self, plan) -> None:
        rows = len(plan.decoded) if plan.prefill else len(plan.seqs)
        ms = (self.prompt_ms + self.prompt_token_ms * sum(plan.chunks) if plan.prefill
              else self.decode_ms * plan.steps) + self.row_ms * rows * plan.steps
        self.now += max(ms, self.prompt_floor_ms) if plan.prefill else ms


def replay(w, rows: int, max_loras: int, steps: int, budget: int, blocks: int,
           max_bypass: int, prefix_caching: bool = True, order: str = "input",
           rank_of: dict | None = None, slot_ids: int | None = None,
           on_step=None, clock: Clock | None = None, hold: tuple[int, int] = (0, 0)) -> dict:
    """The workload's schedule, submitted in ``order`` (as ``LLMEngine.generate``'s), with
    ``max_loras`` rank-64 slots' memory shared by up to ``slot_ids`` adapters (default:
    max_loras); ``rank_of``: lora id -> rank. ``on_step(n, plan, mem)``: called with each
    step's number (a round's first), plan and slot memory once its adapters are placed; a
    true return ends the replay there (its figures are then of the steps so far).
    ``clock``: model the time of each step and cold adapter loads (Clock). ``hold``: the
    scheduler's (prefill_min_tokens, prefill_max_wait)."""
    if order == "longest_first":
        w = bulk.reordered(w, longest_first(w.max_tokens))
    elif order == "by_adapter":   # each adapter's requests together, longest answers first
        w = bulk.reordered(w, sorted(range(len(w.adapter)),
                                     key=lambda i: (w.adapter[i], -w.max_tokens[i], i)))
    ids = slot_ids or max_loras
    sch = Scheduler(rows, ids, BlockManager(blocks, 16, prefix_caching), budget,
                    max_bypass=max_bypass, num_steps=steps, max_model_len=5120,
                    prefill_min_tokens=hold[0], prefill_max_wait=hold[1])
    mem = sch.slot_memory = SlotPages(ids, 64, max_loras)
    mem.rank_of.update(rank_of or {})
    seqs = []
    for i, (p, m, a) in enumerate(zip(w.prompts, w.max_tokens, w.adapter)):
        s = Sequence(str(i), None, p, SamplingParams(max_tokens=m, temperature=0.0,
                                                     ignore_eos=True),
                     LoRARequest(f"a{a}", a + 1, f"/adapters/{a}"),
                     RequestMetrics(arrival_time=0.0), adapter_key=repr(a).encode())
        seqs.append(s)
        sch.add(s)
    if clock is not None:
        clock.submit(seqs)
    decode_rows, mixed, decode_only, rounds, started, step = [], 0, 0, 0, {}, 0
    rank = rank_of or {}
    # prompt-bearing / decode steps: adapters, the sum of their ranks, and the rows the
    # row-buffer kernels read (each rank rounded up to 16)
    lora = {True: [0, 0, 0], False: [0, 0, 0]}
    tiled = {4: 0, 8: 0, 16: 0}
    host = {True: [], False: []}         # seconds in schedule() + finish(): prefill or not
    while sch.has_unfinished():
        t0 = time.perf_counter()
        plan = sch.schedule(ready=clock.ready if clock is not None else None)
        spent = time.perf_counter() - t0
        if not plan.seqs:
            if clock is None:
                raise RuntimeError("the schedule stalled")
            clock.wait()
            continue
        if clock is not None:
            clock.step(plan)
        _place(mem, plan.seqs, sch.running_adapters())
        if on_step is not None and on_step(step + 1, plan, mem):
            break
        rows_of: dict = {}
        for s in plan.seqs:
            rows_of[s.lora_id] = rows_of.get(s.lora_id, 0) + 1
        ranks = [rank.get(lid, 64) for lid in rows_of]
        for i, n in enumerate((len(ranks), sum(ranks), sum(map(rows_read, ranks)))):
            lora[plan.prefill][i] += n * plan.steps
        if not plan.prefill:   # read again by each decode-kernel tile of up to t rows
            for t in tiled:
                tiled[t] += plan.steps * sum(rows_read(rank.get(lid, 64)) * -(-n // t)
                                             for lid, n in rows_of.items())
        if plan.prefill:
            step += 1
            for s, c in zip(plan.prefilled, plan.chunks):
                started.setdefault(s, step)
                s.num_computed_tokens += c
            mixed += bool(plan.decoded)
            decode_rows.append(len(plan.decoded))
            emit = [[s for s in plan.prefilled if not s.prefilling] + plan.decoded]
        else:
            decode_only += plan.steps
            rounds += plan.steps > 1
            decode_rows += [len(plan.seqs)] * plan.steps
            step += plan.steps
            emit = [plan.seqs] * plan.steps
        for group in emit:
            for s in group:
                if s.status is SequenceStatus.RUNNING:
                    s.output_token_ids.append(1)
                    if len(s.output_token_ids) >= s.params.max_tokens:
                        t0 = time.perf_counter()
                        sch.finish(s)
                        spent += time.perf_counter() - t0
        host[plan.prefill].append(spent)
    waits = [started[s] for s in seqs if s in started] or [0]
    longest: dict = {}
    for a, m in zip(w.adapter, w.max_tokens):
        longest[a] = max(longest.get(a, 0), m)
    modelled = None if clock is None else {
        "seconds": round(clock.now / 1e3, 2), "idle_seconds": round(clock.idle / 1e3, 2),
        "cold_loads": sum(t > 0 for t in clock.ready_at.values()),
        "last_load_done_s": round(max(clock.ready_at.values(), default=0) / 1e3, 2),
        "load_ms": clock.load_ms, "loaders": clock.loaders}
    return {"order": order, "max_loras": max_loras, "num_scheduler_steps": steps,
            "prefill_min_tokens": hold[0], "prefill_max_wait": hold[1],
            "held_rounds": sch.held_rounds,
            **({"modelled": modelled} if modelled else {}),
            "slot_ids": ids, "lora_evictions": mem.evictions,
            "whole_slot_floor_steps": round(sum(longest.values()) / max_loras),
            "max_num_batched_tokens": budget, "max_bypass": max_bypass,
            "steps": step, "mixed_steps": mixed, "prefill_only_steps": step - decode_only - mixed,
            "decode_only_steps": decode_only, "rounds": rounds,
            "mean_decode_rows": round(statistics.mean(decode_rows or [0]), 1),
            # distinct adapters a step, the sum of their ranks (the A and B rows its LoRA
            # needs) and the rows the row-buffer kernels read (ranks rounded up to 16), per
            # decode-only and per prompt-bearing step
            **{f"{what}_per_{kind}_step": round(lora[pre][i] / max(1, n), 1)
               for kind, pre, n in (("decode", False, decode_only),
                                    ("prompt", True, step - decode_only))
               for i, what in enumerate(("adapters", "lora_ranks", "lora_rows_read"))},
            # the same rows read again by each tile of up to t rows of one adapter (the
            # decode kernels' m-tiles), per decode step
            "lora_rows_read_in_tiles_per_decode_step": {
                t: round(n / max(1, decode_only), 1) for t, n in tiled.items()},
            "peak_running": sch.peak_running, "preemptions": sch.preemptions,
            "first_step_of_request": {"median": statistics.median(waits), "max": max(waits)},
            "prefix_caching": prefix_caching,
            "prefix_hit_rate": sch.blocks.stats()["prefix_hit_rate"],
            # the scheduler's host time (this machine's CPU): per prefill-bearing plan and per
            # decode plan (a round is one plan), and in all
            "host_ms": {"per_prefill_plan": round(1e3 * statistics.mean(host[True] or [0]), 3),
                        "per_decode_plan": round(1e3 * statistics.mean(host[False] or [0]), 3),
                        "total_s": round(sum(host[True]) + sum(host[False]), 2)}}


def _place(mem: SlotPages, seqs, running: set[int]) -> None:
    """What LLMEngine._slots does with the slot memory: the step's new adapters placed largest
    first, the others made most recently used."""
    new = {s.lora_id for s in seqs if mem.lookup(s.lora_id) is None}
    for lid in mem.placement_order(new):
        n = mem.pages_for(lid)
        slot, first, _ = mem.make_room(lid, n, running)
        mem.place(lid, slot, first, n)
    for s in seqs:
        if s.lora_id not in new:
            mem.slot_of.move_to_end(s.lora_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-loras", type=int, nargs="+", default=[32])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8],
                    help="num_scheduler_steps settings")
    ap.add_argument("--budget", type=int, nargs="+",
                    default=[EngineConfig.__dataclass_fields__["max_num_batched_tokens"].default],
                    help="max_num_batched_tokens settings (default: EngineConfig's)")
    ap.add_argument("--max-bypass", type=int, nargs="+", default=[16])
    ap.add_argument("--blocks", type=int, default=40000,
                    help="KV pool in blocks of 16 (40,000: ~80 GB of Llama-3-8B keys/values)")
    ap.add_argument("--prefix-caching", choices=["on", "off"], nargs="+", default=["on"])
    ap.add_argument("--order", choices=(*GENERATE_ORDERS, "by_adapter"), nargs="+",
                    default=["input"],
                    help="submission orders (LLMEngine.generate's order): input, or the "
                         "longest answers first (generate's default); by_adapter: each "
                         "adapter's requests together (most popular first), longest first")
    ap.add_argument("--slot-ids", type=int, nargs="+", default=[0],
                    help="adapters resident at once (max_loras) sharing --max-loras slots' "
                         "memory by rank (0: as many as slots, i.e. whole slots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold-load-ms", type=float, nargs="*", default=[],
                    help="also model each step's time (Clock) with adapters loading one after "
                         "another this long each (0: all loaded up front, the baseline), "
                         "e.g. 0 130: the cold loads' part of a run")
    ap.add_argument("--loaders", type=int, nargs="+", default=[1],
                    help="loads at a time in the model (the engine's loader: 1)")
    ap.add_argument("--warm-requests", type=int, default=64,
                    help="the adapters of the first N requests of the seed + 1 workload are "
                         "loaded before (bulk.py's warm-up, --warmup)")
    ap.add_argument("--step-model", default="20,0.026,12,0.047", metavar="P,PT,D,R[,F]",
                    help="Clock's ms: a prompt-bearing step, a prompt token, a decode step, "
                         "a decoding row, and optionally the least a prompt-bearing step "
                         "takes (default: fitted to an H100's bulk run: ~113 ms a "
                         "3,560-token prompt step, ~21 ms a 190-row decode step, no floor)")
    ap.add_argument("--hold", nargs="+", default=["0,0"], metavar="TOKENS,STEPS",
                    help="the scheduler's prefill_min_tokens,prefill_max_wait settings "
                         "(default 0,0: off)")
    ap.add_argument("--model-time", action="store_true",
                    help="model each run's time with --step-model, all adapters loaded "
                         "(as --cold-load-ms 0)")
    args = ap.parse_args()
    spec = dict(bulk.SPECS["gpu"])
    w = bulk.make_workload(spec, args.requests, LLAMA3_8B["vocab_size"], args.seed)
    ranks = bulk.adapter_ranks(spec, args.seed)
    rank_of = {a + 1: r for a, r in enumerate(ranks)}      # replay's lora ids are a + 1
    warm = {a + 1 for a in bulk.make_workload(spec, args.warm_requests,
                                              LLAMA3_8B["vocab_size"], args.seed + 1).adapter}
    model = [float(x) for x in args.step_model.split(",")]
    if args.model_time and not args.cold_load_ms:
        args.cold_load_ms = [0.0]
    holds = [tuple(int(x) for x in h.split(",")) for h in args.hold]
    clocks = [None] if not args.cold_load_ms else [
        (ms, n) for ms in args.cold_load_ms for n in (args.loaders if ms else [1])]
    runs = [replay(w, args.rows, ml, k, b, args.blocks, mb, pc == "on", o, rank_of, ids,
                   clock=None if c is None else Clock(c[0], warm, c[1], *model), hold=hd)
            for ml, k, b, mb, pc, o, ids, c, hd in
            itertools.product(args.max_loras, args.steps, args.budget, args.max_bypass,
                              args.prefix_caching, args.order, args.slot_ids, clocks, holds)]
    print(json.dumps({"benchmark": "schedule_replay", "date": time.strftime("%Y-%m-%d"),
                      "requests": args.requests, "rows": args.rows, "seed": args.seed,
                      "output_tokens": sum(w.max_tokens), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
