"""Fairness under a flood: one tenant's bulk load against another tenant's few jobs (JSON out).

python benchmarks/fairness.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test

The real Drainer and JobQueue on PostgreSQL drain into a stand-in engine with ``--rows`` rows
(64) whose ``step()`` sleeps ``--step-ms`` (5 ms) and finishes each job after ``--tokens``
steps (16); it keeps the adapters of the jobs it was given in ``--gpu-slots`` LRU slots and
reports them through ``list_loras`` as the real engine does, so adapter affinity is live.

Three runs, each in a fresh database (``--repeat`` pairs of the first two):
- ``flood``: tenant A's ``--flood`` jobs (5,000) on ``--flood-adapters`` adapters (1);
- ``flood+small``: the same, and once ``--small-after`` of A's jobs entered the engine, a
  separate process (as the API would be) submits tenant B's ``--small`` jobs (20) on B's own
  adapter (``--same-name``: named like A's first adapter);
- ``small``: B's jobs alone on an idle worker.
Figures: A's throughput (jobs/s, from its first job entering the engine to its last
finishing) in ``flood`` and ``flood+small`` and their ratio; B's wait in ``flood+small``
counted from the commit of B's submit: A's jobs claimed before B's first claimed, A's jobs
that entered the engine before B's first did, seconds to B's first job entering the engine
and to B's last finishing, the latter against the idle worker's. ``--flood-only`` runs
``flood`` alone (A's throughput only).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pg_fresh import drop_database, fresh_database
from stand_in import finished

from lorry.scheduler import JobQueue, JobSpec
from lorry.scheduler.migrate import upgrade
from lorry.workers.drain import Drainer


@dataclass
class SlotEngine:
    """Finishes each request after `tokens` steps of `step_s`; keeps the adapters it served
    in `slots` GPU slots (least recently used evicted); records when each request entered
    and finished (time.monotonic())."""

    step_s: float
    tokens: int
    slots: int
    rows: dict = field(default_factory=dict)        # request id -> steps left
    gpu: OrderedDict = field(default_factory=OrderedDict)
    started: list = field(default_factory=list)     # (t, request id), in order
    finished: dict = field(default_factory=dict)    # request id -> t
    on_start: object = None                         # called with the request id

    def list_loras(self) -> dict:
        return {"gpu": list(self.gpu), "cpu": []}

    def cache_stats(self) -> dict:
        return {}

    def add_request(self, request_id, prompt, params, lora_request=None) -> None:
        if lora_request is not None:
            self.gpu[lora_request.lora_int_id] = True
            self.gpu.move_to_end(lora_request.lora_int_id)
            while len(self.gpu) > self.slots:
                self.gpu.popitem(last=False)
        self.rows[request_id] = self.tokens
        self.started.append((time.monotonic(), request_id))
        if self.on_start is not None:
            self.on_start(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.rows)

    def abort_request(self, request_id):
        return None if self.rows.pop(request_id, None) is None else self._output(request_id)

    def step(self) -> list:
        time.sleep(self.step_s)
        done, now = [], time.monotonic()
        for rid in list(self.rows):
            self.rows[rid] -= 1
            if self.rows[rid] <= 0:
                del self.rows[rid]
                self.finished[rid] = now
                done.append(self._output(rid))
        return done

    def _output(self, rid):
        return finished(rid, self.tokens, 1)


class RecordingQueue:
    """The JobQueue, with every claim's return time and claimed job ids recorded."""

    def __init__(self, queue: JobQueue):
        self._queue, self.claims = queue, []

    def __getattr__(self, name):
        return getattr(self._queue, name)

    def claim(self, *args, **kwargs):
        batches = self._queue.claim(*args, **kwargs)
        self.claims.append((time.monotonic(), [j.id for mb in batches for j in mb.jobs]))
        return batches


def fresh_migrated_database(url: str) -> tuple[str, str]:
    name, db = fresh_database(url, prefix="lorry_fair")
    upgrade(db)
    return name, db


def small_submitter(db: str, tenant_id: str, adapter: str, n: int, tokens: int, ready, go,
                    out) -> None:
    """In its own process (as the API is): set `ready` once imported and connected, wait for
    `go`, submit B's jobs, report the monotonic time after the commit and the job ids."""
    queue = JobQueue(db, create=False)
    specs = [JobSpec(adapter, prompt=f"b{i}", sampling={"max_tokens": tokens}) for i in range(n)]
    queue.get_tenant(tenant_id)  # connected before the clock starts
    ready.set()
    go.wait()
    jobs = queue.submit(tenant_id, specs)
    out.put((time.monotonic(), [j.id for j in jobs]))
    queue.close()


def setup(queue: JobQueue, args) -> tuple:
    """Tenants A and B with their adapters: (a id, a's adapter names, b id, b's adapter name)."""
    a, _ = queue.create_tenant("flooder")
    b, _ = queue.create_tenant("small")
    names = [f"style{k}" for k in range(args.flood_adapters)]
    for name in names:
        queue.register_adapter(name, f"/adapters/a/{name}", tenant_id=a.id, rank=8)
    b_name = names[0] if args.same_name else "b-style"
    queue.register_adapter(b_name, f"/adapters/b/{b_name}", tenant_id=b.id, rank=8)
    return a.id, names, b.id, b_name


def run(url: str, args, flood: bool, small: bool) -> dict:
    name, db = fresh_migrated_database(url)
    queue = JobQueue(db, create=False)
    ctx = mp.get_context("spawn")
    child = None
    try:
        a_id, names, b_id, b_name = setup(queue, args)
        a_jobs = set()
        if flood:
            a_jobs = {j.id for j in queue.submit(a_id, [
                JobSpec(names[i % len(names)], prompt=f"a{i}",
                        sampling={"max_tokens": args.tokens}) for i in range(args.flood)])}
        engine = SlotEngine(args.step_ms / 1000, args.tokens, args.gpu_slots)
        ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
        if small:
            child = ctx.Process(target=small_submitter, args=(
                db, b_id, b_name, args.small, args.tokens, ready, go, out))
            child.start()
            if not ready.wait(120):
                raise TimeoutError("the submitting process did not start within 120 s")
            threshold = args.small_after if flood else 0
            engine.on_start = _trigger(a_jobs, threshold, go)
            if threshold == 0:
                go.set()
        recorder = RecordingQueue(queue)
        drainer = Drainer(recorder, engine, "bench-worker", max_num_seqs=args.rows,
                          heartbeat_seconds=2, lease_seconds=120, claim_ahead=args.claim_ahead)
        if small and not flood:
            _wait_for_queued(queue, args.small)
        drainer.heartbeat()  # registers the worker and its rows, as a Celery worker does
        started = time.monotonic()
        drainer.run()
        committed, b_jobs = out.get(timeout=60) if small else (None, [])
        if committed is not None:  # an idle worker: counted from its start
            committed = max(committed, started)
        return figures(engine, recorder, a_jobs, set(b_jobs), committed)
    finally:
        if child is not None:
            child.join(timeout=60)
        queue.close()
        drop_database(url, name)


def _trigger(a_jobs: set, threshold: int, go):
    seen = [0]

    def on_start(request_id):
        if request_id in a_jobs:
            seen[0] += 1
            if seen[0] == threshold:
                go.set()
    return on_start


def _wait_for_queued(queue: JobQueue, n: int) -> None:
    deadline = time.monotonic() + 60
    while sum(c for s, _, _, c in queue.queue_depth() if s == "queued") < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the small tenant's jobs were not queued within 60 s")
        time.sleep(0.05)


def figures(engine: SlotEngine, recorder: RecordingQueue, a_jobs: set, b_jobs: set,
            committed: float | None) -> dict:
    out: dict = {}
    a_starts = [t for t, rid in engine.started if rid in a_jobs]
    if a_jobs:
        a_end = max(engine.finished[j] for j in a_jobs)
        out["flood_jobs"] = len(a_jobs)
        out["flood_jobs_per_s"] = round(len(a_jobs) / (a_end - a_starts[0]), 1)
    if not b_jobs:
        return out
    claimed_before = 0
    for t, ids in recorder.claims:
        if any(j in b_jobs for j in ids):
            break
        if t > committed:
            claimed_before += sum(1 for j in ids if j in a_jobs)
    b_first = min(t for t, rid in engine.started if rid in b_jobs)
    out.update(
        small_jobs=len(b_jobs),
        flood_claimed_before_small=claimed_before,
        flood_started_before_small=sum(
            1 for t, rid in engine.started if rid in a_jobs and committed < t < b_first),
        small_first_start_s=round(b_first - committed, 4),
        small_done_s=round(max(engine.finished[j] for j in b_jobs) - committed, 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL server (a fresh database is made per run)")
    ap.add_argument("--flood", type=int, default=5000)
    ap.add_argument("--flood-adapters", type=int, default=1)
    ap.add_argument("--small", type=int, default=20)
    ap.add_argument("--small-after", type=int, default=1000,
                    help="B submits once this many of A's jobs entered the engine")
    ap.add_argument("--same-name", action="store_true",
                    help="B's adapter has the name of A's first adapter")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--claim-ahead", type=int, default=None,
                    help="the Drainer's claim_ahead (default: its own, rows // 8)")
    ap.add_argument("--gpu-slots", type=int, default=8)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="flood / flood+small pairs")
    ap.add_argument("--flood-only", action="store_true",
                    help="only the flood runs (the flooder's throughput, nothing else)")
    args = ap.parse_args()
    if args.flood_only:
        rates = [run(args.url, args, flood=True, small=False)["flood_jobs_per_s"]
                 for _ in range(args.repeat)]
        print(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "url"},
                          "flood_alone_jobs_per_s": rates}))
        return
    alone, mixed = [], []
    for _ in range(args.repeat):
        alone.append(run(args.url, args, flood=True, small=False))
        mixed.append(run(args.url, args, flood=True, small=True))
    idle = run(args.url, args, flood=False, small=True)
    median = statistics.median
    base = median(r["flood_jobs_per_s"] for r in alone)
    with_small = median(r["flood_jobs_per_s"] for r in mixed)
    print(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k != "url"},
        "flood_alone_jobs_per_s": [r["flood_jobs_per_s"] for r in alone],
        "flood_with_small_jobs_per_s": [r["flood_jobs_per_s"] for r in mixed],
        "flood_throughput_ratio": round(with_small / base, 4),
        "small_wait": [{k: v for k, v in r.items() if not k.startswith("flood_jobs")}
                       for r in mixed],
        "small_alone_done_s": idle["small_done_s"],
        "small_done_ratio": [round(r["small_done_s"] / idle["small_done_s"], 2)
                             for r in mixed]}, indent=1))


if __name__ == "__main__":
    main()
