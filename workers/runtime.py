"""The worker's process-wide state: one engine, one queue, one drainer (built once at start)."""
from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime = None
_migrated = False  # the database was found at this code's migrations (require_migrated)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def build_engine(settings):
    """The engine a worker serves with, from the LORRY_* settings."""
    from lorry.engine import LLMEngine

    engine = LLMEngine(settings.engine_config())
    if settings.compile_kernels and engine.device.type == "cuda":
        # every kernel variant a step can pick, now rather than a second each mid-drain
        # (read from Triton's on-disk cache after the first start on a machine). Only an
        # optimisation: should it fail, the worker serves and its kernels compile as steps
        # meet them, as before (one that cannot compile fails its step's jobs, with the
        # error on them, not the worker's start)
        try:
            report = engine.compile_kernels(use_tqdm=False)
            log.info("compiled the kernels of %d step shapes in %.1f s", report["steps"],
                     report["seconds"])
        except Exception as e:  # noqa: BLE001
            log.warning("the kernel warm-up failed (%s: %s); kernels compile as steps meet "
                        "them", type(e).__name__, e)
    return engine


def build_drainer(settings, queue=None, engine=None, publish=True, **kw):
    """A Drainer over the settings' database and model (each built unless given)."""
    from lorry.scheduler import JobQueue
    from lorry.workers.drain import Drainer
    from lorry.workers.stats import RedisStatsPublisher

    worker_id = settings.worker_id or default_worker_id()
    queue = queue or JobQueue.for_settings(settings)
    engine = engine or build_engine(settings)
    publisher = RedisStatsPublisher(settings.broker_url, settings.redis_prefix, worker_id) \
        if publish else None
    if publish:  # streaming jobs' text, step by step, for the API's stream=true answers
        from lorry.workers.tokens import TokenPublisher

        engine.on_tokens = TokenPublisher(settings.broker_url, settings.redis_prefix)
    # Beat's maintain runs on a worker between drains: while every worker drains, the
    # drains expire deadlines and finalize batches themselves, once a maintain interval.
    kw.setdefault("upkeep", lambda: queue.upkeep(due_after_s=settings.maintain_interval))
    kw.setdefault("upkeep_seconds", settings.maintain_interval)
    # and once as a drain ends: the batch whose last jobs it ran is done now (with no beat, or
    # a drain shorter than the interval, it waited for beat's maintain, or for ever)
    kw.setdefault("final_upkeep", queue.upkeep)
    kw.setdefault("check_adapter", adapter_rules(settings))
    return Drainer(queue, engine, worker_id, max_num_seqs=settings.max_num_seqs,
                   lease_seconds=settings.lease_seconds,
                   heartbeat_seconds=settings.heartbeat_seconds,
                   cancel_poll_seconds=settings.cancel_poll_seconds, publish=publisher, **kw)


def adapter_rules(settings):
    """A check of a claimed job's adapter (an AdapterInfo) against the registration rules of
    now: its tenant's roots (LORRY_ADAPTER_ROOTS_PER_TENANT) and LORRY_ALLOW_HUB_ADAPTERS. The
    engine checks only the plain roots when it reads the files, so a tenant's directory swapped
    for a link into another tenant's root, or a Hub id kept from before Hub adapters were
    turned off, would load there; this refuses them (AdapterSourceError, a ValueError). It
    returns the tenant's roots (None: the plain roots apply), which the drainer hands to the
    engine in the LoRARequest: checked again when the files are read, so a directory swapped
    after this check is refused there too."""
    from lorry.engine.lora.sources import check_source, tenant_roots  # torch-free

    def check(adapter) -> tuple[str, ...] | None:
        roots, own = list(settings.adapter_roots), None
        if adapter.tenant_id is not None and settings.adapter_roots_per_tenant:
            roots = own = tenant_roots(roots, adapter.tenant_id)
        check_source(adapter.source, revision=adapter.revision, roots=roots,
                     allow_hub=settings.allow_hub_adapters, reveal=False)
        return None if own is None else tuple(str(r) for r in own)
    return check


def get_drainer(settings):
    """The process's drainer over ``settings``; the engine is loaded on the first call only,
    once the database is found migrated: ``errors.NotMigrated`` before any model is read. A
    database that cannot be reached is checked again before the first drain."""
    global _runtime
    with _lock:
        if _runtime is None:
            from lorry.scheduler import JobQueue
            from lorry.scheduler.errors import Unavailable

            queue = JobQueue.for_settings(settings)  # SQLite: migrated here
            try:
                require_migrated(queue)
            except Unavailable as e:
                log.warning("cannot check the job database's migration now (%s): it is "
                            "checked before the first drain", e)
            _runtime = build_drainer(settings, queue=queue)
        return _runtime


def migrated_drainer(settings):
    """``get_drainer(settings)`` once its database is found migrated (checked here when it
    could not be as the worker started): ``errors.NotMigrated`` before any job is claimed."""
    drainer = get_drainer(settings)
    if not _migrated:
        require_migrated(drainer.queue)
    return drainer


def require_migrated(queue) -> None:
    """Raise ``errors.NotMigrated`` when the queue's database is behind this code's
    migrations: no result this worker finished could be stored, and each of those jobs
    would fail. ``errors.Unavailable`` when it cannot be reached: the next call checks again.
    Once passed, never again (migrations only move forward)."""
    global _migrated
    if not _migrated:
        queue.require_migrated()
        _migrated = True


def unpublish() -> None:
    """Remove this process's worker figures from Redis (clean shutdown), if it built a
    drainer that publishes them; never builds one."""
    with _lock:
        publish = getattr(_runtime, "publish", None)
    clear = getattr(publish, "clear", None)
    if clear is not None:
        clear()


_queues: dict = {}


def queue_for(settings):
    """A JobQueue per database URL, reused across maintain runs (its connection pool)."""
    from lorry.scheduler import JobQueue

    if settings.database_url not in _queues:
        _queues[settings.database_url] = JobQueue.for_settings(settings)
    return _queues[settings.database_url]
