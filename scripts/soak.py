"""Soak: many jobs over many adapters and tenants through the real services while GPU workers
are killed (-9) at random; prints JSON with lost, duplicated and the time to drain.

    .venv/bin/python scripts/soak.py --jobs 10000 --adapters 200 --tenants 20 --workers 3
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from chaos_harness import (
    FINAL,
    RedisServer,
    Services,
    audit,
    batch_lines,
    service_env,
    status_counts,
)


def build_model(root: Path, n_adapters: int, rank: int) -> tuple[Path, Path, list[str]]:
    """A tiny random Llama and ``n_adapters`` random PEFT adapters under one root."""
    from lorry.testing import make_tiny_llama, write_random_adapter

    model = make_tiny_llama(root / "tiny-llama")
    cfg = json.loads((model / "config.json").read_text())
    adapter_root = root / "adapters"
    names = []
    for i in range(n_adapters):
        name = f"ad{i:03d}"
        write_random_adapter(adapter_root / name, cfg, r=rank, seed=i,
                             base_model_name_or_path=str(model))
        names.append(name)
    return model, adapter_root, names


def fresh_database(admin_url: str) -> tuple[str, callable]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"lorry_soak_{uuid.uuid4().hex[:8]}"
    dsn = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop


def soak(args) -> dict:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lorry-soak-"))
    model, adapter_root, names = build_model(root, args.adapters, args.rank)
    redis = RedisServer()
    db_url, drop_db = fresh_database(args.postgres)
    env = service_env(db_url, redis.url, model, adapter_root, root,
                      LORRY_LEASE_SECONDS=str(args.lease), LORRY_MAX_NUM_SEQS=str(args.seqs),
                      LORRY_MAX_LORAS=str(args.max_loras), LORRY_MAX_CPU_LORAS="64",
                      LORRY_MAX_BATCH_LINES=str(args.jobs))
    services = Services(env, root / "logs", workers=args.workers)
    kills, submitted, batches = 0, 0, []
    try:
        from lorry.scheduler import JobQueue

        q = JobQueue(db_url)
        keys = []
        for t in range(args.tenants):  # tenants and their adapters through the gateway
            tenant, key = q.create_tenant(f"tenant{t:02d}")
            keys.append(key)
            for name in names[t::args.tenants]:
                q.register_adapter(name, str(adapter_root / name), tenant_id=tenant.id,
                                   base_model=str(model), rank=args.rank)
        q.close()
        per_tenant = args.jobs // args.tenants
        t0 = time.monotonic()
        for t, key in enumerate(keys):  # each tenant uploads one OpenAI batch file
            own = names[t::args.tenants]
            lines = batch_lines(per_tenant, own, args.max_tokens, prefix=f"t{t}")
            body = "".join(json.dumps(x) + "\n" for x in lines).encode()
            resp = httpx.post(f"{services.api}/v1/batches", content=body, timeout=300,
                              headers={"Authorization": f"Bearer {key}"})
            resp.raise_for_status()
            batches.append((key, resp.json()["id"]))
            submitted += resp.json()["request_counts"]["total"]
        next_kill = time.monotonic() + rng.uniform(*args.kill_every)
        deadline = time.monotonic() + args.timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = status_counts(db_url)
            done = sum(counts.get(s, 0) for s in FINAL)
            if done >= submitted:
                break
            # the first kill also comes once --first-kill-after jobs are done, so that a fast
            # machine that drains before the first timer still loses a worker mid-drain
            early = kills == 0 and args.first_kill_after and done >= args.first_kill_after
            if (time.monotonic() >= next_kill or early) and services.workers:
                victim = rng.choice(services.workers)
                services.kill(victim)  # SIGKILL mid-drain, then a fresh worker takes its place
                services.add_worker()
                kills += 1
                next_kill = time.monotonic() + rng.uniform(*args.kill_every)
            time.sleep(0.2)   # fine enough to catch the --first-kill-after point
        drain_s = time.monotonic() - t0
        facts = audit(db_url)
        output_ids: list[str] = []
        for key, batch_id in batches:  # what tenants download: one line per custom_id
            with httpx.stream("GET", f"{services.api}/v1/batches/{batch_id}/output",
                              headers={"Authorization": f"Bearer {key}"}, timeout=120) as r:
                output_ids += [json.loads(x)["custom_id"] for x in r.iter_lines() if x.strip()]
        report = {
            "jobs": submitted, "adapters": args.adapters, "tenants": args.tenants,
            "workers": args.workers, "kills": kills, "max_tokens": args.max_tokens,
            "lease_seconds": args.lease, "statuses": counts,
            "lost": submitted - facts["succeeded"],
            "duplicated": (facts["rows"] - submitted) + facts["duplicate_custom_ids"]
            + (len(output_ids) - len(set(output_ids))),
            "output_lines": len(output_ids), "rerun_after_fault": facts["rerun_after_fault"],
            "max_attempts_seen": facts["max_attempts"], "drain_seconds": round(drain_s, 1),
            "jobs_per_second": round(submitted / drain_s, 1)}
        return report
    finally:
        services.stop()
        redis.kill()
        if not args.keep:
            drop_db()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seqs", type=int, default=32, help="LORRY_MAX_NUM_SEQS per worker")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--lease", type=int, default=5)
    p.add_argument("--kill-every", type=float, nargs=2, default=(30.0, 60.0),
                   metavar=("MIN_S", "MAX_S"))
    p.add_argument("--first-kill-after", type=int, default=0, metavar="JOBS",
                   help="kill the first worker once this many jobs are done, if the "
                        "--kill-every timer has not fired by then (0: the timer only)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the database")
    p.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = p.parse_args(argv)
    report = soak(args)
    print(json.dumps(report))
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
