"""Batch ingest on PostgreSQL: an OpenAI Batch JSONL file through the API into queued jobs
(JSON out). Run on purpose; never by tests.

python benchmarks/ingest.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test \
    --lines 10000,50000
For each size, in a fresh database and a fresh process (the API app in process, no torch):
upload the file (POST /v1/files, multipart), create the batch from it (POST /v1/batches,
OpenAI's SDK flow: the timed ingest), then the same file in one step (POST /v1/batches with a
JSONL body); --one-step-only times only that (it runs on code without /v1/files too, for
a before/after in one session). Validation and prompt-length checks are on (a tiny Llama's tokenizer.json,
max_model_len 512); lines are chat requests over 100 adapters, ~470 bytes each. Peak RSS is
the process's (VmHWM), with its peak before the first upload.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

from pg_fresh import drop_database, fresh_database

ADAPTERS = 100


def write_file(path: Path, lines: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    words = ["lorry", "adapter", "batch", "overnight", "tenant", "queue", "token", "prompt",
             "answer", "summary", "report", "the", "a", "of", "and", "with"]
    with open(path, "w") as f:
        for i in range(lines):
            content = " ".join(rng.choice(words) for _ in range(rng.randint(30, 46)))
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": {"model": f"adapter-{i % ADAPTERS}", "max_tokens": 64,
                                         "temperature": 0.7,
                                         "messages": [{"role": "system",
                                                       "content": "Answer briefly."},
                                                      {"role": "user", "content": content}]}})
                    + "\n")
    return path.stat().st_size


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, MiB (Linux; not
    ru_maxrss, which a spawned child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_size(url: str, model: str, path: str, lines: int, out, one_step_only: bool) -> None:
    """In a fresh process: the timed upload, SDK-flow create and one-step create."""
    from fastapi.testclient import TestClient

    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.scheduler.migrate import upgrade
    from lorry.settings import Settings

    upgrade(url)
    settings = Settings(database_url=url, model=model, max_model_len=512,
                        max_body_bytes=200 * 1024 * 1024, max_batch_lines=max(lines, 50_000))
    queue = JobQueue(url)
    tenant, key = queue.create_tenant("bench")
    for i in range(ADAPTERS):
        queue.register_adapter(f"adapter-{i}", f"/adapters/{i}", tenant_id=tenant.id, rank=8)
    app = create_app(settings, queue=queue, nudger=None, redis_client=None)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {key}"
    client.get("/v1/models")  # warm-up: app start-up, connections, tokenizer load
    result = {"lines": lines, "bytes": Path(path).stat().st_size, "rss_mb_before": rss_mb()}
    if one_step_only:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            one = client.post("/v1/batches", content=f.read(),
                              headers={"Content-Type": "application/jsonl"})
        t1 = time.perf_counter()
        assert one.status_code == 201, one.text
        result.update(one_step_s=round(t1 - t0, 3), one_step_lines_per_s=round(lines / (t1 - t0)),
                      rss_mb_peak=round(rss_mb(), 1), rss_mb_before=round(
                          result["rss_mb_before"], 1), torch_imported="torch" in sys.modules)
        out.put(result)
        return
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        up = client.post("/v1/files", files={"file": ("in.jsonl", f, "application/jsonl")},
                         data={"purpose": "batch"})
    t1 = time.perf_counter()
    assert up.status_code == 201, up.text
    result["rss_mb_peak_after_upload"] = round(rss_mb(), 1)
    batch = client.post("/v1/batches", json={"input_file_id": up.json()["id"],
                                             "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"})
    t2 = time.perf_counter()
    assert batch.status_code == 201, batch.text
    assert batch.json()["request_counts"]["total"] == lines, batch.json()["request_counts"]
    result["rss_mb_peak_after_create"] = round(rss_mb(), 1)
    with open(path, "rb") as f:
        one = client.post("/v1/batches", content=f.read(),
                          headers={"Content-Type": "application/jsonl"})
    t3 = time.perf_counter()
    assert one.status_code == 201, one.text
    result.update(upload_s=round(t1 - t0, 3), upload_mb_per_s=round(result["bytes"] / 2**20 /
                                                                     (t1 - t0), 1),
                  create_s=round(t2 - t1, 3), create_lines_per_s=round(lines / (t2 - t1)),
                  one_step_s=round(t3 - t2, 3), one_step_lines_per_s=round(lines / (t3 - t2)),
                  rss_mb_peak=round(rss_mb(), 1))
    result["rss_mb_before"] = round(result["rss_mb_before"], 1)
    result["torch_imported"] = "torch" in sys.modules  # the API never imports it
    queue.close()
    out.put(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--lines", default="10000,50000")
    ap.add_argument("--one-step-only", action="store_true",
                    help="time only the one-step upload (what code without /v1/files has)")
    args = ap.parse_args()
    from lorry.testing import make_tiny_llama

    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory(prefix="lorry-ingest-") as tmp:
        model = str(make_tiny_llama(Path(tmp) / "tiny-llama"))
        for n in (int(x) for x in args.lines.split(",")):
            path = Path(tmp) / f"batch-{n}.jsonl"
            write_file(path, n)
            name, url = fresh_database(args.url, prefix="lorry_bench_ingest")
            out = ctx.Queue()
            proc = ctx.Process(target=run_size, args=(url, model, str(path), n, out,
                                                          args.one_step_only))
            proc.start()
            results.append(out.get())
            proc.join()
            drop_database(args.url, name)
    print(json.dumps({"benchmark": "ingest", "database": "postgresql", "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
