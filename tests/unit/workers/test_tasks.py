"""The Celery drain task when its engine breaks: the worker stops taking jobs and exits with
status 70 once the task has ended (with a real worker: tests/e2e/test_shutdown.py)."""
from __future__ import annotations

import threading
import time

import pytest


class _Summary:
    reason = "queue empty"

    def to_dict(self):
        return {"reason": self.reason}


@pytest.fixture
def drain_task(monkeypatch):
    from celery.worker import state

    from lorry.workers import runtime, tasks

    monkeypatch.setattr(tasks, "_nudge_taken", lambda settings: None)
    monkeypatch.setattr(tasks, "_shutting_down", threading.Event())
    monkeypatch.setattr(tasks, "_engine_failed", threading.Event())
    monkeypatch.setattr(state, "should_stop", None)
    monkeypatch.setattr(runtime, "_migrated", True)   # its database was found migrated

    def with_drainer(run):
        drainer = type("Drainer", (), {"run": staticmethod(run)})()
        monkeypatch.setattr(runtime, "get_drainer", lambda settings: drainer)
        return tasks, state
    return with_drainer


def test_a_drain_whose_engine_failed_stops_the_worker(drain_task):
    def broken(**kw):   # Drainer.run re-raises the engine's error after giving jobs back
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    tasks, state = drain_task(broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tasks.drain.run()
    assert state.should_stop == tasks.ENGINE_FAILED_EXIT == 70
    assert tasks._shutting_down.is_set()   # a drain still to come claims nothing
    assert tasks.exit_status() == 70       # what `lorry worker` exits with


def test_a_drain_that_ends_keeps_the_worker(drain_task):
    tasks, state = drain_task(lambda **kw: _Summary())
    assert tasks.drain.run() == {"reason": "queue empty"}
    assert state.should_stop is None and not tasks._shutting_down.is_set()
    assert tasks.exit_status() is None


def test_a_worker_started_while_the_database_is_down_waits_for_it(monkeypatch, caplog):
    from lorry.scheduler import errors
    from lorry.workers import runtime, tasks

    def down():
        raise errors.Unavailable()
    engine = type("Engine", (), {"info": staticmethod(dict)})()
    drainer = type("Drainer", (), {"heartbeat": staticmethod(down), "worker_id": "w1",
                                   "engine": engine})()
    monkeypatch.setattr(runtime, "get_drainer", lambda settings: drainer)
    with caplog.at_level("WARNING", logger="lorry.workers.tasks"):
        tasks._load_engine()   # Celery's worker_ready: no traceback, the worker stays up
    assert "waits for it" in caplog.text and "LORRY_DATABASE_URL" in caplog.text


def test_maintain_while_the_database_is_away_is_one_warning_not_a_traceback(monkeypatch,
                                                                            caplog):
    """Beat's maintain raised Unavailable each interval while the database was down: Celery
    logged ~120 lines of traceback every 15 s (an outage audit)."""
    from lorry.scheduler import errors
    from lorry.workers import runtime, tasks

    class Away:
        def reap_expired_leases(self):
            raise errors.Unavailable("connection refused")

    monkeypatch.setattr(runtime, "queue_for", lambda settings: Away())
    with caplog.at_level("WARNING", logger="lorry.workers.tasks"):
        assert tasks.maintain.run() == {"skipped": "database unavailable"}
    assert ["maintain skipped" in r.getMessage() for r in caplog.records] == [True]


def test_a_drain_task_while_the_broker_watch_drains_returns_at_once(drain_task, monkeypatch):
    """Redis came back while the broker watch drains: Celery's drain does not run the same
    engine from a second thread; the watch's drain goes on until the queue is empty."""
    runs = []
    tasks, _ = drain_task(lambda **kw: runs.append(1) or _Summary())
    monkeypatch.setattr(tasks, "_draining", threading.Lock())
    tasks._draining.acquire()
    assert tasks.drain.run() == {"skipped": "this worker is draining already"}
    assert runs == []
    tasks._draining.release()
    assert tasks.drain.run() == {"reason": "queue empty"} and runs == [1]
    assert not tasks._draining.locked()


def test_the_broker_watch_drains_while_redis_is_away_and_stops_once_it_is_back(
        drain_task, monkeypatch, caplog):
    """While the broker cannot be reached an idle worker drains the job table itself, every
    interval; once Redis answers, only Celery's drains run. One warning each way, not one
    per interval."""
    runs, up = [], threading.Event()

    def run(**kw):
        runs.append(kw)
        s = _Summary()
        s.succeeded = s.failed = s.cancelled = 0
        return s
    tasks, _ = drain_task(run)
    monkeypatch.setattr(tasks, "_draining", threading.Lock())
    watch = threading.Thread(target=tasks._watch_broker, args=(0.01, lambda t: up.is_set()),
                             daemon=True)
    with caplog.at_level("WARNING", logger="lorry.workers.tasks"):
        watch.start()
        deadline = time.monotonic() + 10
        while len(runs) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(runs) >= 4                      # a drain each interval while away
        assert runs[0]["should_stop"] == tasks._shutting_down.is_set
        up.set()
        time.sleep(0.2)
        seen = len(runs)
        time.sleep(0.2)
        assert len(runs) == seen                   # back: no drain of its own
        tasks._shutting_down.set()
        watch.join(5)
    assert not watch.is_alive()
    said = [r.getMessage() for r in caplog.records]
    assert sum("cannot be reached" in m for m in said) == 1
    assert sum("reachable again" in m for m in said) == 1


def test_a_watch_drain_cut_by_its_time_limit_goes_on_at_once_or_as_a_drain_task(
        drain_task, monkeypatch):
    """At its time limit a drain task queues itself again: the watch's drain goes on at once
    while the broker is away, and queues a drain task once it is back."""
    reasons = iter(["time limit", "time limit", "queue empty"])

    def run(**kw):
        s = _Summary()
        s.reason = next(reasons)
        s.succeeded, s.failed, s.cancelled, s.seconds = 1, 0, 0, 0.1
        return s
    tasks, _ = drain_task(run)
    monkeypatch.setattr(tasks, "_draining", threading.Lock())
    queued = []
    monkeypatch.setattr(tasks.drain, "apply_async", lambda *a, **kw: queued.append(1))
    tasks._fallback_drain(lambda t: False)          # away: three drains back to back
    assert next(reasons, "done") == "done" and queued == []
    reasons = iter(["time limit"])
    tasks._fallback_drain(lambda t: True)           # back: the rest is Celery's
    assert queued == [1] and not tasks._draining.locked()


def test_a_drain_task_skipped_beside_the_watch_still_clears_the_nudge_key(drain_task,
                                                                          monkeypatch):
    tasks, _ = drain_task(lambda **kw: _Summary())
    cleared = []
    monkeypatch.setattr(tasks, "_nudge_taken", lambda settings: cleared.append(1))
    monkeypatch.setattr(tasks, "_draining", threading.Lock())
    tasks._draining.acquire()
    assert tasks.drain.run() == {"skipped": "this worker is draining already"}
    assert cleared == [1]      # a submission from now on nudges again


def test_the_broker_watch_waits_for_a_database_that_is_away_too(drain_task, monkeypatch,
                                                                caplog):
    from lorry.scheduler import errors

    def down(**kw):
        raise errors.Unavailable("connection refused")
    tasks, state = drain_task(down)
    monkeypatch.setattr(tasks, "_draining", threading.Lock())
    with caplog.at_level("WARNING", logger="lorry.workers.tasks"):
        tasks._fallback_drain(lambda t: False)
    assert "job database cannot be reached" in caplog.text
    assert not tasks._draining.locked() and state.should_stop is None
