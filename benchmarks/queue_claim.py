"""Queue benchmark on PostgreSQL: the bare SKIP LOCKED queue against Lorry's queue (JSON out).

python benchmarks/queue_claim.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test \
    --sizes 10000,1000000
Each size runs in a fresh database: bulk enqueue (jobs/s), then 4 claimer processes take
micro-batches of 32 (jobs/s, p50/p99 claim latency), each after one warm-up claim that is
not timed (it opens the connection). Jobs spread over 1,000 adapters and
100 tenants (10 adapters per tenant), submitted in bulk calls of 10,000 jobs (submit_many).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time

import psycopg
from pg_fresh import drop_database, fresh_database, pg_dsn

ADAPTERS, TENANTS = 1000, 100
SUBMIT_CHUNK = 10_000  # jobs per bulk submit call


def percentiles(lat: list[float]) -> dict:
    lat = sorted(lat)
    pick = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2)
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "mean_ms":
            round(1000 * statistics.fmean(lat), 2)}


def run_claimers(target, args: tuple, claimers: int, claims: int) -> dict:
    ctx = mp.get_context("spawn")
    out, start, ready = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(i, claims, start, ready, out) + args)
             for i in range(claimers)]
    for p in procs:
        p.start()
    for _ in procs:  # every process imported, connected and warmed up: start the clock
        ready.get()
    t0 = time.perf_counter()
    start.set()
    results = [out.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    lat = [x for r in results for x in r["lat"]]
    jobs = sum(r["jobs"] for r in results)
    return {"claimed": jobs, "claim_jobs_per_s": round(jobs / wall), **percentiles(lat)}


# ---- the bare textbook queue -----------------------------------------------------------------
def bare_claimer(i, claims, start, ready, out, dsn, batch):
    conn = psycopg.connect(dsn, autocommit=True)
    sql = ("WITH picked AS MATERIALIZED (SELECT id FROM bare_jobs WHERE status = 0 ORDER BY id "
           "LIMIT %s FOR UPDATE SKIP LOCKED) UPDATE bare_jobs j SET status = 1, worker = %s "
           "FROM picked WHERE j.id = picked.id RETURNING j.id, j.adapter, j.payload")
    conn.execute(sql, (batch, f"w{i}")).fetchall()  # warm-up claim, not timed (as Lorry's)
    ready.put(i)
    start.wait()
    lat, jobs = [], 0
    for _ in range(claims):
        t = time.perf_counter()
        jobs += len(conn.execute(sql, (batch, f"w{i}")).fetchall())
        lat.append(time.perf_counter() - t)
    out.put({"lat": lat, "jobs": jobs})


def bench_bare(url: str, n: int, claimers: int, batch: int, claims: int) -> dict:
    _, db = fresh_database(url, "lorry_bench_bare")
    dsn = pg_dsn(db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bare_jobs (id bigserial PRIMARY KEY, tenant int, adapter int,"
                     " status smallint NOT NULL DEFAULT 0, worker text, payload text,"
                     " created_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("CREATE INDEX bare_queued ON bare_jobs (id) WHERE status = 0")
        rng = random.Random(0)
        t = time.perf_counter()
        with conn.cursor().copy("COPY bare_jobs (tenant, adapter, payload) FROM STDIN") as cp:
            for k in range(n):
                tenant = rng.randrange(TENANTS)
                cp.write_row((tenant, tenant * 10 + rng.randrange(10), f"prompt {k}"))
        enqueue = n / (time.perf_counter() - t)
        # As for Lorry's tables: vacuumed now, so autovacuum does not start during the claims.
        conn.execute("VACUUM ANALYZE bare_jobs")
    res = run_claimers(bare_claimer, (dsn, batch), claimers, claims)
    drop_database(url, "lorry_bench_bare")
    return {"enqueue_jobs_per_s": round(enqueue), **res}


# ---- Lorry's queue -----------------------------------------------------------------------------
def lorry_claimer(i, claims, start, ready, out, db, batch):
    from lorry.scheduler import JobQueue
    q = JobQueue(db, create=False)
    # One warm-up claim before the clock starts, as the bare claimer's: it opens the
    # connection (a worker does that once, at start), not part of a claim's steady cost.
    mbs = q.claim(f"w{i}", hot=[], warm=[], free_slots=batch)
    hot: list[int] = [m.adapter.id for m in mbs if m.adapter is not None][-8:]
    ready.put(i)
    start.wait()
    lat, jobs = [], 0
    for _ in range(claims):
        t = time.perf_counter()
        mbs = q.claim(f"w{i}", hot=hot, warm=[], free_slots=batch)
        lat.append(time.perf_counter() - t)
        jobs += sum(len(m.jobs) for m in mbs)
        # A worker's GPU slots hold what it just ran (8 slots, most recent last).
        hot = (hot + [m.adapter.id for m in mbs if m.adapter is not None])[-8:]
    q.close()
    out.put({"lat": lat, "jobs": jobs})


def bench_lorry(url: str, n: int, claimers: int, batch: int, claims: int) -> dict:
    from lorry.scheduler import JobQueue, JobSpec
    from lorry.scheduler.migrate import upgrade
    _, db = fresh_database(url, "lorry_bench_queue")
    upgrade(db)
    q = JobQueue(db, create=False)
    tenants = [q.create_tenant(f"t{k}")[0].id for k in range(TENANTS)]
    for a in range(ADAPTERS):
        q.register_adapter(f"a{a}", f"/adapters/a{a}")
    rng = random.Random(0)
    # Bulk submit calls of SUBMIT_CHUNK jobs over many tenants (one transaction each), as a
    # front end batching its incoming requests would; spec building is not timed.
    t, done, elapsed = time.perf_counter(), 0, 0.0
    while done < n:
        specs: dict[str, list] = {}
        for k in range(done, min(n, done + SUBMIT_CHUNK)):
            tenant = rng.randrange(TENANTS)
            specs.setdefault(tenants[tenant], []).append(JobSpec(
                f"a{tenant * 10 + rng.randrange(10)}", prompt=f"prompt {k}",
                sampling={"max_tokens": 32}))
        t = time.perf_counter()
        q.submit_many(specs)
        elapsed += time.perf_counter() - t
        done = min(n, done + SUBMIT_CHUNK)
    enqueue = n / elapsed
    with q.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # Vacuumed (not only analyzed) before the claims, as the bare table: otherwise the
        # autovacuum the bulk insert calls for may start in the middle of the timed claims.
        conn.exec_driver_sql("VACUUM ANALYZE")
    q.close()
    res = run_claimers(lorry_claimer, (db, batch), claimers, claims)
    drop_database(url, "lorry_bench_queue")
    return {"enqueue_jobs_per_s": round(enqueue), **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get(
        "LORRY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--sizes", default="10000,1000000",
                    help="comma-separated queued-job counts")
    ap.add_argument("--claimers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--claims", type=int, default=400, help="claims per claimer process")
    args = ap.parse_args()
    report = {"claimers": args.claimers, "batch": args.batch, "adapters": ADAPTERS,
              "tenants": TENANTS, "cpus": os.cpu_count(), "runs": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        # Never drain the queue: claim at most ~60% of it (warm-up claims included), so
        # every claim finds work.
        claims = max(1, min(args.claims, int(0.6 * n / (args.claimers * args.batch)) - 1))
        bare = bench_bare(args.url, n, args.claimers, args.batch, claims)
        lorry = bench_lorry(args.url, n, args.claimers, args.batch, claims)
        report["runs"].append({"queued": n, "claims_per_claimer": claims, "bare": bare,
                               "lorry": lorry, "claim_ratio_lorry_over_bare": round(
                                   lorry["claim_jobs_per_s"] / bare["claim_jobs_per_s"], 3)})
        print(json.dumps(report["runs"][-1]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
