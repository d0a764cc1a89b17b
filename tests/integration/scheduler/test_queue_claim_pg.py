"""PostgreSQL claim path: its own connection pool survives a dropped connection, and the
cached claim snapshot (scheduler.claim_cache) follows writes made in this process."""
from __future__ import annotations

import psycopg
import pytest

from scheduler import JobSpec


@pytest.fixture
def pg_queue(make_queue, db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL claim path")
    return make_queue()


def test_claim_reconnects_after_its_connection_is_killed(pg_queue, db_url):
    t, _ = pg_queue.create_tenant("t")
    pg_queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(10)])
    assert len(pg_queue.claim("w1", [], [], free_slots=4)[0].jobs) == 4
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:  # kill the claim pool's backend
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> "
                               "pg_backend_pid() AND query LIKE '%%FOR UPDATE SKIP LOCKED%%'"
                               ).fetchone()[0]
    assert killed >= 1
    again = pg_queue.claim("w1", [], [], free_slots=4)
    assert len(again[0].jobs) == 4


def test_cached_snapshot_sees_this_process_submits_and_cancels(pg_queue):
    t, _ = pg_queue.create_tenant("t")
    pg_queue.register_adapter("x", "/adapters/x")
    pg_queue.register_adapter("y", "/adapters/y")
    pg_queue.submit(t.id, [JobSpec("x", prompt=str(i)) for i in range(40)])
    assert {mb.adapter.name for mb in pg_queue.claim("w1", ["x"], [], free_slots=8)} == {"x"}
    # A new, higher-priority job right after: the next claim (within the cache's TTL) sees it.
    [urgent] = pg_queue.submit(t.id, [JobSpec("y", prompt="now", priority=5)])
    first = pg_queue.claim("w1", ["x"], [], free_slots=1)
    assert [j.id for mb in first for j in mb.jobs] == [urgent.id]
    # Cancelled queued jobs are not planned for: the claim is full, from what is left.
    rest = pg_queue.list_jobs(t.id, status="queued", limit=100)
    for job in rest[:20]:
        pg_queue.cancel(job.id, t.id)
    got = [j.id for mb in pg_queue.claim("w1", ["x"], [], free_slots=12) for j in mb.jobs]
    assert len(got) == 12 and not {j.id for j in rest[:20]} & set(got)
