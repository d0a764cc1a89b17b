"""A worker's running figures (jobs, tokens, latencies, cache) and their publication in Redis."""
from __future__ import annotations

import bisect
import json
import logging
import time

log = logging.getLogger(__name__)
CLAIM_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JOB_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class Histogram:
    """Per-bucket counts (not cumulative) plus sum and count, JSON-serialisable."""

    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.count = list(bounds), [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def to_dict(self) -> dict:
        return {"bounds": self.bounds, "counts": self.counts, "sum": self.sum, "count": self.count}


class WorkerStats:
    """Cumulative counters of one worker process, published for the API's ``/metrics``."""

    def __init__(self):
        self.jobs = {"succeeded": 0, "failed": 0, "cancelled": 0}
        self.drains = 0
        self.tokens_generated = 0
        self.tokens_per_second = 0.0
        self.claim_latency = Histogram(CLAIM_BOUNDS)
        self.job_run = Histogram(JOB_BOUNDS)
        self.cache: dict = {}

    def to_dict(self) -> dict:
        return {"jobs_succeeded": self.jobs["succeeded"], "jobs_failed": self.jobs["failed"],
                "jobs_cancelled": self.jobs["cancelled"], "drains": self.drains,
                "tokens_generated": self.tokens_generated,
                "tokens_per_second": self.tokens_per_second,
                "claim_latency": self.claim_latency.to_dict(), "job_run": self.job_run.to_dict(),
                "cache": self.cache, "updated_at": time.time()}


class RedisStatsPublisher:
    """Write the figures under ``<prefix>:stats:<worker_id>`` with a TTL (dead workers vanish;
    idle ones publish nothing until their next drain, hence the hour)."""

    def __init__(self, redis_url: str, prefix: str, worker_id: str, ttl: int = 3600):
        import redis

        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._key, self._ttl = f"{prefix}:stats:{worker_id}", ttl

    def __call__(self, stats: WorkerStats) -> None:
        try:
            self._redis.set(self._key, json.dumps(stats.to_dict()), ex=self._ttl)
        except Exception as e:  # metrics are best effort; the jobs are what matter
            log.warning("cannot publish worker stats: %s", e)

    def clear(self) -> None:
        """Remove the figures (a worker that stops cleanly leaves /metrics at once; one that
        dies leaves with the TTL)."""
        try:
            self._redis.delete(self._key)
        except Exception as e:  # best effort, as publishing
            log.warning("cannot remove worker stats: %s", e)


KV_FIELDS = ("blocks_total", "blocks_free", "prefix_query_tokens", "prefix_hit_tokens",
             "preemptions")


SLOT_FIELDS = ("rows", "rows_used", "residents", "capacity")


def cache_counts(engine) -> dict:
    """{"gpu"|"cpu": {hits, misses, evictions}, "kv": {KV_FIELDS}, "slots": {SLOT_FIELDS}}
    from the engine's cache_stats() (adapter caches, the KV block pool with its prefix cache,
    and the LoRA slot memory: its rows, those resident adapters hold, adapters resident and
    slot ids)."""
    try:
        stats = engine.cache_stats()
    except Exception:  # figures only; never stop a drain for them
        return {}
    out = {level: {k: stats[level].get(k, 0) for k in ("hits", "misses", "evictions")}
           for level in ("gpu", "cpu") if isinstance(stats.get(level), dict)}
    if isinstance(stats.get("kv"), dict):
        out["kv"] = {k: stats["kv"].get(k, 0) for k in KV_FIELDS}
    gpu = stats.get("gpu")
    if isinstance(gpu, dict) and "rows" in gpu:
        out["slots"] = {k: gpu.get(k, 0) for k in SLOT_FIELDS}
    return out
