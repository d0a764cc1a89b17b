"""/readyz says "not ready" when the lease reaper stopped running (beat down, no worker)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def later(service):
    """The same service seen from a process whose clock runs `set(seconds)` ahead: a queue
    on the same database with that clock, and its app."""
    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.scheduler.db import utcnow

    _, _, settings, nudges = service
    start = utcnow()
    offset = {"s": 0.0}
    queue = JobQueue(settings.database_url, clock=lambda: start + timedelta(seconds=offset["s"]))
    app = create_app(settings, queue=queue, nudger=nudges, redis_client=None)
    with TestClient(app) as client:
        client.queue = queue
        client.set = lambda seconds: offset.update(s=seconds)
        yield client
    queue.close()


def test_a_stalled_lease_reaper_is_not_ready_until_a_claim_or_beat_reaps(later):
    # Just migrated: the reaper's record starts now, and 30 s is within its allowance
    # (4 maintain intervals of 15 s).
    later.set(30)
    assert later.get("/readyz").json() == {"status": "ok"}
    later.set(3600)  # an hour without beat's maintain and without a claiming worker
    r = later.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    body = r.json()
    assert body["status"] == "unavailable" and "database" not in body
    assert "lease reaper last ran 36" in body["reaper"] and "allowed: 60 s" in body["reaper"]
    assert "lorry beat" in body["reaper"] and "jobs of a lost worker stay running" in body["reaper"]
    assert later.queue.claim("worker-1", [], [], free_slots=4) == []  # a worker polls
    assert later.get("/readyz").json() == {"status": "ok"}
    later.set(7200)
    assert later.get("/readyz").status_code == 503
    later.queue.reap_expired_leases()  # beat's maintain
    assert later.get("/readyz").json() == {"status": "ok"}


def test_a_missing_reaper_record_is_not_ready(service, later):
    from sqlalchemy import delete

    from lorry.scheduler.models import MaintenanceRun

    with later.queue.engine.begin() as conn:
        conn.execute(delete(MaintenanceRun))
    r = later.get("/readyz")
    assert r.status_code == 503 and "no pass of the lease reaper" in r.json()["reaper"]
