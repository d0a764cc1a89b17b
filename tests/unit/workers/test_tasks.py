"""The Celery drain task when its engine breaks: the worker stops taking jobs and exits with
status 70 once the task has ended (with a real worker: tests/e2e/test_shutdown.py)."""
from __future__ import annotations

import threading

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
