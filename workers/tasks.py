"""Celery tasks: ``drain`` (GPU worker) and ``maintain`` (beat), plus worker start/stop hooks."""
from __future__ import annotations

import logging
import os
import threading

from celery import signals

from lorry.workers.celery_app import app, settings

log = logging.getLogger(__name__)
_shutting_down = threading.Event()
_engine_failed = threading.Event()   # this worker stops because its drain's engine failed
_not_migrated = threading.Event()    # ... because the job database is behind its migrations
_draining = threading.Lock()         # one drain at a time in this process: Celery's or the
                                     # broker watch's (tasks run on Celery's one solo thread)


@signals.worker_ready.connect
def _load_engine(**_):
    """Load the engine once when the worker starts (`lorry worker` has loaded it already), and
    register the worker; a database that is down is waited for, as the drains do."""
    from lorry.scheduler.errors import NotMigrated, Unavailable
    from lorry.workers.runtime import get_drainer

    try:
        drainer = get_drainer(settings)
    except NotMigrated as e:  # a Celery worker started without `lorry worker`'s check
        _stop_worker_unmigrated(e)
        return
    log.info("worker %s ready: %s", drainer.worker_id, drainer.engine.info())
    if _draining.locked():   # the broker watch drained before Celery had the broker: its
        return               # drain beats for the worker (a second heartbeat would race it)
    try:
        drainer.heartbeat()
    except Unavailable as e:
        log.warning("cannot register with the job database (%s): this worker waits for it; "
                    "check LORRY_DATABASE_URL and that the database is running", e)


@signals.worker_shutting_down.connect
def _stop_draining(**_):
    # Warm shutdown: the running drain stops claiming and releases what it holds.
    _shutting_down.set()


@signals.worker_shutdown.connect
def _unpublish(**_):
    # The pool has stopped (solo: the drain is over): this worker's /metrics series go now,
    # not with their Redis TTL an hour later. A drain of the broker watch (a thread of its
    # own, which Celery does not wait for) gives back what it holds first.
    if _draining.acquire(timeout=60):   # past the drainer's own 30 s results flush
        _draining.release()
    from lorry.workers.runtime import unpublish

    unpublish()


@app.task(name="lorry.drain", bind=True)
def drain(self) -> dict:
    """Drain the queue through this worker's engine until it is empty (or a time limit)."""
    _nudge_taken(settings)   # (a submission from now on nudges again, skipped or not)
    if not _draining.acquire(blocking=False):   # the broker watch drains: it goes until the
        return {"skipped": "this worker is draining already"}   # queue is empty
    try:
        summary = _drain_once()
    finally:
        _draining.release()
    if summary.reason == "time limit":  # give maintain and other tasks a turn, then go on
        drain.apply_async()
    return summary.to_dict()


def _drain_once():
    """One drain through the process's engine (the caller holds ``_draining``)."""
    from lorry.scheduler.errors import NotMigrated, Retryable, Unavailable
    from lorry.workers.runtime import migrated_drainer

    try:
        return migrated_drainer(settings).run(max_seconds=settings.drain_max_seconds,
                                              should_stop=_shutting_down.is_set)
    except (Unavailable, Retryable):   # the database, not the engine: the next drain retries
        raise
    except NotMigrated as e:   # nothing claimed yet
        _stop_worker_unmigrated(e)
        raise
    except Exception as e:
        _stop_worker_after(e)
        raise


@signals.worker_init.connect
def _start_broker_watch(**_):
    """Before Celery first connects to the broker: watch it from a thread of its own."""
    if settings.broker_fallback_seconds > 0:
        threading.Thread(target=_watch_broker, args=(settings.broker_fallback_seconds,),
                         name="lorry-broker-watch", daemon=True).start()


def _broker_reachable(timeout: float) -> bool:
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=timeout,
                                  socket_connect_timeout=timeout, retry_on_timeout=False)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _watch_broker(every: float, reachable=_broker_reachable) -> None:
    """Workers hear of work only through Celery messages over Redis (nudges, beat's maintain
    nudge), so while Redis is away an idle worker would never start, and queued jobs would
    wait for Redis however long it took. Instead, every ``every`` seconds that the broker
    cannot be reached, this drains the job table itself, as a drain task would (claims are
    leased rows in the database, so several workers doing this share the jobs as usual);
    once Redis is back, drains come from Celery again. A drain task that arrives while this
    one runs returns at once (``_draining``)."""
    away = False
    while not _shutting_down.wait(every):
        if reachable(min(every, 2.0)):
            if away:
                log.warning("the broker is reachable again: drains come from Celery")
            away = False
            continue
        if not away:
            log.warning("the broker (LORRY_BROKER_URL) cannot be reached: this worker looks "
                        "for queued jobs in the job table every %g s and drains them itself "
                        "until it is back", every)
            away = True
        _fallback_drain(reachable)


def _fallback_drain(reachable) -> None:
    from lorry.scheduler.errors import Retryable, Unavailable

    while not _shutting_down.is_set() and _draining.acquire(blocking=False):
        try:
            summary = _drain_once()
        except (Unavailable, Retryable) as e:   # the database is away too: try again later
            log.warning("drain without the broker skipped: the job database cannot be "
                        "reached (%s)", e)
            return
        except Exception:   # the engine failed (or the database is not migrated): _drain_once
            # has logged it and given the jobs back; Celery may be stuck reconnecting to the
            # broker, so stop here
            logging.shutdown()
            os._exit(exit_status() or ENGINE_FAILED_EXIT)
        finally:
            _draining.release()
        if summary.succeeded or summary.failed or summary.cancelled:
            log.info("drained without the broker: %d succeeded, %d failed, %d cancelled in "
                     "%.1f s", summary.succeeded, summary.failed, summary.cancelled,
                     summary.seconds)
        # at its time limit a drain task queues itself again; here the next one goes on at
        # once while the broker is still away, or is a drain task once it is back
        if summary.reason != "time limit":
            return
        if reachable(1.0):
            try:
                drain.apply_async()
            except Exception as e:  # noqa: BLE001  beat's next maintain nudges instead
                log.warning("could not queue the next drain: %s", e)
            return


# Exit status of a worker stopped because its drain broke (EX_SOFTWARE): a supervisor that
# restarts on failure starts a fresh process (compose's gpu-worker: restart unless-stopped).
ENGINE_FAILED_EXIT = 70
# ... because the job database is behind its migrations: as `lorry worker` refusing it at start
NOT_MIGRATED_EXIT = 2


def _stop_worker_after(error: Exception) -> None:
    """The drain broke out of its engine loop; its jobs are back in the queue, an attempt
    counted (``Drainer.run``). An engine whose step raised may be broken for good (a CUDA
    error poisons the process's context, a half-done step its scheduler state): draining on
    with it would spend the attempts of every job this worker claims, any tenant's. So the
    worker stops once this task has ended (Celery's warm stop, exit status 70) and takes no
    more, as vLLM's server ends when its engine dies; the other workers, or this one
    restarted by its supervisor with a fresh engine, run the jobs."""
    from celery.worker import state

    log.critical("the drain's engine failed (%s); this worker stops after the task and takes "
                 "no more jobs (exit status %d): restart it for a fresh engine",
                 type(error).__name__, ENGINE_FAILED_EXIT)
    _shutting_down.set()
    _engine_failed.set()
    state.should_stop = ENGINE_FAILED_EXIT


def _stop_worker_unmigrated(error: Exception) -> None:
    """The job database is behind this worker's migrations (found once it could be reached,
    before any job was claimed): every result the worker finished could not be stored and
    its job would fail, so it stops (exit status 2) and takes no job; started again after
    `lorry db upgrade`, it runs them."""
    from celery.worker import state

    log.critical("%s; this worker stops and takes no jobs (exit status %d)", error,
                 NOT_MIGRATED_EXIT)
    _shutting_down.set()
    _not_migrated.set()
    state.should_stop = NOT_MIGRATED_EXIT


def exit_status() -> int | None:
    """The status the worker process exits with once Celery has stopped: ENGINE_FAILED_EXIT
    after an engine failure, NOT_MIGRATED_EXIT on a database behind its migrations, else None
    (Celery's own)."""
    if _engine_failed.is_set():
        return ENGINE_FAILED_EXIT
    return NOT_MIGRATED_EXIT if _not_migrated.is_set() else None


def _nudge_taken(settings) -> None:
    """Clear the API's de-duplication key: a job submitted from now on nudges again, so a
    submission that races with the end of this drain is never left to beat alone."""
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2)
        client.delete(f"{settings.redis_prefix}:nudge:drain")
        client.close()
    except redis.RedisError as e:
        log.warning("cannot clear the nudge key: %s", e)


@app.task(name="lorry.maintain")
def maintain() -> dict:
    """Reaper, deadline expiry, batch finalization, worker pruning; nudge drain if work waits."""
    from lorry.scheduler.errors import Retryable, Unavailable
    from lorry.workers.runtime import queue_for

    q = queue_for(settings)
    try:
        done = {"reaped": q.reap_expired_leases(), **q.upkeep(),
                "workers_pruned": q.prune_workers(settings.prune_workers_after)}
        queued = sum(n for status, _, _, n in q.queue_depth() if status == "queued")
    except (Unavailable, Retryable) as e:  # one line, not a traceback each interval: the
        # next maintain (beat's, or a drain's upkeep) does it when the database is back
        log.warning("maintain skipped: the job database cannot be reached (%s)", e)
        return {"skipped": "database unavailable"}
    if queued:
        drain.apply_async()
    done["queued"] = queued
    return done
