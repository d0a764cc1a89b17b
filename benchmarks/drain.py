"""End-to-end drain benchmark: the real Drainer + JobQueue into a stand-in engine (JSON out).

python benchmarks/drain.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test

The stand-in engine's ``step()`` takes a fixed time (``--step-ms``, 5 ms: an 8B decode step
at batch 64 on the H200 takes ~5.5 ms; a sleep, so it holds no lock, as a GPU step waits
on the device) and finishes each request after its ``max_tokens`` steps. It stands for the
engine alone, which is busy 100% of the time; the figure is the busy fraction = time in
``step()`` / wall time, from the first claim to the last result recorded, for jobs of 1, 16
and 128 tokens over 64 rows, on PostgreSQL and on SQLite. A last row gives jobs/s recorded
per worker with 1-token jobs and 1 ms steps (an engine that is as good as infinitely fast).
Jobs spread over 8 adapters and 4 tenants.

With ``--engine llama3-8b --device cuda`` (the H200; Llama-3-8B shapes, dummy weights, 32
random adapters r16 on q/k/v/o) or ``--engine tiny`` (a tiny random Llama, any device), the
real engine serves ``--jobs`` requests twice in one run: ``engine.generate`` on them all
(the engine alone), then the same requests as jobs drained through ``Drainer`` from an
embedded SQLite table; the row gives both output tokens/s and the service's share.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field

from stand_in import finished

from lorry.scheduler import JobQueue, JobSpec
from lorry.scheduler.migrate import upgrade
from lorry.workers.drain import Drainer


@dataclass
class StandInEngine:
    """Finishes each request after max_tokens steps of a fixed duration."""

    step_s: float
    rows: dict = field(default_factory=dict)  # request id -> [tokens left, generated, prompt]
    busy_s: float = 0.0
    steps: int = 0

    def list_loras(self) -> dict:
        return {"gpu": [], "cpu": []}

    def cache_stats(self) -> dict:
        return {}

    def add_request(self, request_id, prompt, params, lora_request=None) -> None:
        self.rows[request_id] = [params.max_tokens, 0, len(str(prompt))]

    def has_unfinished_requests(self) -> bool:
        return bool(self.rows)

    def abort_request(self, request_id):
        row = self.rows.pop(request_id, None)
        return None if row is None else self._output(request_id, row, "abort")

    def step(self) -> list:
        t0 = time.perf_counter()
        time.sleep(self.step_s)
        done = []
        for rid, row in list(self.rows.items()):
            row[0] -= 1
            row[1] += 1
            if row[0] <= 0:
                done.append(self._output(rid, self.rows.pop(rid), "length"))
        self.steps += 1
        self.busy_s += time.perf_counter() - t0
        return done

    @staticmethod
    def _output(rid, row, reason):
        return finished(rid, row[1], row[2], reason)


def run_one(db_url: str, jobs: int, max_tokens: int, step_ms: float, rows: int,
            drainer_cls=Drainer, **drainer_kw) -> dict:
    upgrade(db_url)
    queue = JobQueue(db_url)
    try:
        tenants = [queue.create_tenant(f"t{i}")[0] for i in range(4)]
        adapters = [queue.register_adapter(f"a{i}", f"/adapters/a{i}", rank=8).name
                    for i in range(8)]
        by_tenant = {t.id: [JobSpec(adapter=adapters[(i + k) % len(adapters)], prompt=f"p{i}",
                                    sampling={"max_tokens": max_tokens})
                            for i in range(jobs // len(tenants))]
                     for k, t in enumerate(tenants)}
        queue.submit_many(by_tenant)
        engine = StandInEngine(step_ms / 1000)
        drainer = drainer_cls(queue, engine, "bench", max_num_seqs=rows, heartbeat_seconds=2,
                              lease_seconds=60, **drainer_kw)
        t0 = time.perf_counter()
        summary = drainer.run()
        wall = time.perf_counter() - t0
    finally:
        queue.close()
    return {"jobs": summary.succeeded, "claim_ahead": drainer.claim_ahead, "max_tokens": max_tokens, "step_ms": step_ms,
            "rows": rows, "wall_s": round(wall, 3), "busy": round(engine.busy_s / wall, 4),
            "jobs_per_s": round(summary.succeeded / wall, 1), "steps": engine.steps,
            "reason": summary.reason}


def real_engine_row(kind: str, device: str, jobs: int, max_tokens: int, prompt_len: int,
                    rows: int) -> dict:
    """Engine alone vs the same requests drained through the queue (see the module doc)."""
    import random

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
    from lorry.testing import make_tiny_llama, make_tiny_tokenizer, write_random_adapter

    tmp = tempfile.mkdtemp(prefix="lorry-drain-")
    if kind == "llama3-8b":
        from throughput import LLAMA3_8B

        model = f"{tmp}/llama3-8b-dummy"
        import os
        os.makedirs(model)
        with open(f"{model}/config.json", "w") as f:
            json.dump(LLAMA3_8B, f)
        make_tiny_tokenizer(model)
        config, load_format, n_adapters = LLAMA3_8B, "dummy", 32
    else:
        model = str(make_tiny_llama(f"{tmp}/tiny"))
        with open(f"{model}/config.json") as f:
            config = json.load(f)
        load_format, n_adapters = "auto", 8
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapters = [str(write_random_adapter(f"{tmp}/a{i}", config, r=16, seed=i,
                                         target_modules=targets)) for i in range(n_adapters)]
    engine = LLMEngine(EngineConfig(model=model, device=device, max_loras=n_adapters,
                                    max_cpu_loras=n_adapters, max_lora_rank=16,
                                    max_num_seqs=rows, load_format=load_format,
                                    max_model_len=prompt_len + max_tokens + 16))
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(prompt_len))
               for _ in range(jobs)]
    names = [i % n_adapters for i in range(jobs)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, adapters[i]) for i in range(n_adapters)]
    warm = min(jobs, 2 * rows)  # adapters loaded, graphs captured, kernels compiled
    engine.generate(prompts[:warm], params, lora_request=[loras[n] for n in names[:warm]],
                    use_tqdm=False)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, lora_request=[loras[n] for n in names],
                           use_tqdm=False)
    alone_s = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    with tempfile.TemporaryDirectory() as db:
        url = f"sqlite:///{db}/drain.db"
        upgrade(url)
        queue = JobQueue(url)
        tenant, _ = queue.create_tenant("bench")
        for i, path in enumerate(adapters):  # ids 1..n, as the engine already caches them
            queue.register_adapter(f"a{i}", path, rank=16)
        queue.submit(tenant.id, [JobSpec(adapter=f"a{n}", prompt=p, sampling={
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
            for p, n in zip(prompts, names)])
        drainer = Drainer(queue, engine, "bench", max_num_seqs=rows, heartbeat_seconds=2)
        t0 = time.perf_counter()
        summary = drainer.run()
        service_s = time.perf_counter() - t0
        queue.close()
    return {"engine": kind, "device": device, "jobs": jobs, "max_tokens": max_tokens,
            "prompt_len": prompt_len, "rows": rows, "adapters": n_adapters,
            "engine_tok_s": round(tokens / alone_s, 1),
            "service_tok_s": round(summary.tokens / service_s, 1),
            "service_share": round((summary.tokens / service_s) / (tokens / alone_s), 4),
            "succeeded": summary.succeeded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL server (a fresh database is made per run)")
    ap.add_argument("--backends", nargs="+", default=["postgresql", "sqlite"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="about how long the engine alone would take per run")
    ap.add_argument("--max-jobs", type=int, default=20000)
    ap.add_argument("--claim-ahead", type=int, default=None,
                    help="Drainer(claim_ahead=...): jobs claimed beyond the free rows")
    ap.add_argument("--throughput-jobs", type=int, default=8000,
                    help="1-token jobs for the jobs/s row (1 ms steps); 0 skips it")
    ap.add_argument("--engine", default="stand-in", choices=["stand-in", "tiny", "llama3-8b"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--jobs", type=int, default=2000, help="real engine: requests per run")
    ap.add_argument("--prompt-len", type=int, default=128, help="real engine: prompt tokens")
    args = ap.parse_args()
    if args.engine != "stand-in":
        for max_tokens in args.tokens:
            print(json.dumps(real_engine_row(args.engine, args.device, args.jobs, max_tokens,
                                             args.prompt_len, args.rows)), flush=True)
        return
    # the engine alone finishes `rows` jobs every max_tokens steps
    runs = [(t, args.step_ms, min(args.max_jobs, int(args.seconds / (args.step_ms / 1000)
                                                     / t * args.rows))) for t in args.tokens]
    if args.throughput_jobs:
        runs.append((1, 1.0, args.throughput_jobs))
    for backend in args.backends:
        for max_tokens, step_ms, jobs in runs:
            jobs -= jobs % 4
            if backend == "sqlite":
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_one(f"sqlite:///{tmp}/drain.db", jobs, max_tokens, step_ms,
                                  args.rows, claim_ahead=args.claim_ahead)
            else:
                from pg_fresh import drop_database, fresh_database  # PostgreSQL rows only

                name, url = fresh_database(args.url, prefix="lorry_drain")
                try:
                    row = run_one(url, jobs, max_tokens, step_ms, args.rows,
                                  claim_ahead=args.claim_ahead)
                finally:
                    drop_database(args.url, name)
            print(json.dumps({"backend": backend, **row}), flush=True)


if __name__ == "__main__":
    main()
