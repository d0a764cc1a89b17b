"""Prometheus metrics: queue depth from the job table, figures workers publish in Redis."""
from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger(__name__)


class QueueCollector:
    """Collected on every scrape: ``lorry_jobs`` from SQL, worker figures from Redis.

    ``lorry_jobs`` is labelled by status only, unless ``tenant_labels`` (the operator's
    opt-in): then also by adapter name and tenant id, which tell one tenant's business to
    whoever reads the metrics.
    """

    def __init__(self, queue, redis_client=None, prefix: str = "lorry",
                 tenant_labels: bool = False):
        self.queue, self.redis, self.prefix = queue, redis_client, prefix
        self.tenant_labels = tenant_labels

    def worker_stats(self) -> dict[str, dict]:
        if self.redis is None:
            return {}
        try:
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:stats:*", count=500))
            values = self.redis.mget(keys) if keys else []
        except Exception as e:  # Redis down: queue depth is still worth serving
            log.warning("cannot read worker stats from Redis: %s", e)
            return {}
        out = {}
        for key, raw in zip(keys, values):
            if raw:
                name = key.decode() if isinstance(key, bytes) else key
                out[name.split(":stats:", 1)[1]] = json.loads(raw)
        return out

    def collect(self):
        rows = self.queue.queue_depth()
        if self.tenant_labels:
            depth = GaugeMetricFamily("lorry_jobs", "Queued and running jobs by adapter and "
                                      "tenant", labels=["status", "adapter", "tenant"])
            # one sample per label set: a tenant's own adapter and a shared one of the same
            # name, or base-model jobs beside a deleted adapter's (no name: ""), are summed
            # (two samples of one series were a scrape Prometheus drops one of)
            merged: dict[tuple[str, str, str], int] = {}
            for status, adapter, tenant, count in rows:
                key = (status, adapter or "", str(tenant))
                merged[key] = merged.get(key, 0) + count
            for labels, count in merged.items():
                depth.add_metric(list(labels), count)
        else:
            depth = GaugeMetricFamily("lorry_jobs", "Queued and running jobs",
                                      labels=["status"])
            totals = {"queued": 0, "running": 0}
            for status, _adapter, _tenant, count in rows:
                totals[status] = totals.get(status, 0) + count
            for status, count in totals.items():
                depth.add_metric([status], count)
        yield depth
        stats = self.worker_stats()
        yield from _counters(stats)
        for name, doc in (("claim_latency", "Time of one claim() call"),
                          ("job_run", "Time from claim to result on a worker")):
            yield _histogram(f"lorry_{name}_seconds", doc, [s.get(name) for s in stats.values()])


def _counters(stats: dict[str, dict]):
    specs = [("lorry_worker_jobs", "Jobs a worker finished, by outcome", ["outcome"],
              lambda s: [(["succeeded"], s.get("jobs_succeeded", 0)),
                         (["failed"], s.get("jobs_failed", 0)),
                         (["cancelled"], s.get("jobs_cancelled", 0))]),
             ("lorry_worker_drain_tasks", "drain runs a worker executed", [],
              lambda s: [([], s.get("drains", 0))]),
             ("lorry_worker_generated_tokens", "Tokens a worker generated", [],
              lambda s: [([], s.get("tokens_generated", 0))])]
    for name, doc, labels, values in specs:
        fam = CounterMetricFamily(name, doc, labels=["worker", *labels])
        for worker, s in stats.items():
            for label_values, v in values(s):
                fam.add_metric([worker, *label_values], v)
        yield fam
    tps = GaugeMetricFamily("lorry_worker_tokens_per_second",
                            "Generated tokens/s of a worker over its last drain that generated any",
                            labels=["worker"])
    for worker, s in stats.items():
        tps.add_metric([worker], s.get("tokens_per_second", 0.0))
    yield tps
    for event in ("hits", "misses", "evictions"):
        fam = CounterMetricFamily(f"lorry_adapter_cache_{event}", f"Adapter cache {event}",
                                  labels=["worker", "level"])
        for worker, s in stats.items():
            for level, c in (s.get("cache") or {}).items():
                if level in ("gpu", "cpu") and isinstance(c, dict) and event in c:
                    fam.add_metric([worker, level], c[event])
        yield fam
    yield from _kv_families(stats)
    yield from _slot_families(stats)


def _slot_families(stats: dict[str, dict]):
    """Each worker's LoRA slot memory (shared by rank): its rows, the rows resident adapters
    hold, the adapters resident and the slot ids (max_loras)."""
    yield from _cache_families(stats, "slots", [
        (GaugeMetricFamily, "lorry_lora_slot_rows",
         "Rows of LoRA slot memory (max-rank rows of A and B)", "rows"),
        (GaugeMetricFamily, "lorry_lora_slot_rows_used",
         "Rows of LoRA slot memory resident adapters hold", "rows_used"),
        (GaugeMetricFamily, "lorry_lora_resident_adapters", "Adapters resident in GPU slots",
         "residents"),
        (GaugeMetricFamily, "lorry_lora_slot_ids", "GPU slot ids (max_loras)", "capacity")])


def _kv_families(stats: dict[str, dict]):
    """The KV block pool of each worker's engine: prefix-cache tokens looked up and found
    (hit rate = hit / query), preemptions, and the pool's size and free blocks."""
    specs = [(CounterMetricFamily, "lorry_prefix_cache_query_tokens",
              "Prefill tokens looked up in the prefix cache", "prefix_query_tokens"),
             (CounterMetricFamily, "lorry_prefix_cache_hit_tokens",
              "Prefill tokens found in the prefix cache (not computed)", "prefix_hit_tokens"),
             (CounterMetricFamily, "lorry_kv_preemptions",
              "Sequences preempted (recomputed) because the KV pool ran out", "preemptions"),
             (GaugeMetricFamily, "lorry_kv_blocks_total", "KV cache blocks", "blocks_total"),
             (GaugeMetricFamily, "lorry_kv_blocks_free",
              "KV cache blocks free or holding only cached prefixes", "blocks_free")]
    yield from _cache_families(stats, "kv", specs)


def _cache_families(stats: dict[str, dict], section: str, specs):
    """One family per (kind, name, doc, key) of ``specs``: each worker's
    ``cache[section][key]``, labelled by worker."""
    for kind, name, doc, key in specs:
        fam = kind(name, doc, labels=["worker"])
        for worker, s in stats.items():
            part = (s.get("cache") or {}).get(section)
            if isinstance(part, dict) and key in part:
                fam.add_metric([worker], part[key])
        yield fam


def _histogram(name: str, doc: str, hists: list[dict | None]) -> HistogramMetricFamily:
    """Sum the workers' cumulative histograms (same bucket bounds) into one family."""
    fam = HistogramMetricFamily(name, doc)
    bounds, counts, total, n = None, None, 0.0, 0
    for h in hists:
        if not h:
            continue
        if bounds is None:
            bounds, counts = list(h["bounds"]), [0] * len(h["bounds"])
        if list(h["bounds"]) != bounds:
            continue
        counts = [a + b for a, b in zip(counts, h["counts"])]
        total += h["sum"]
        n += h["count"]
    if bounds is not None:
        buckets, running = [], 0
        for bound, c in zip(bounds, counts):
            running += c
            buckets.append((repr(float(bound)), running))
        buckets.append(("+Inf", n))
        fam.add_metric([], buckets, total)
    return fam


def make_registry(queue, redis_client=None, prefix: str = "lorry", tenant_labels: bool = False):
    """A registry per app (tests build many apps) with the collector and API counters."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(queue, redis_client, prefix, tenant_labels))
    submitted = Counter("lorry_api_jobs_submitted", "Jobs accepted by this API process",
                        registry=registry)
    return registry, submitted
