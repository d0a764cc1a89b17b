"""PostgreSQL claim path: its own connection pool survives a dropped connection, a claim the
database aborts is made again, its rows decode by column name, and the cached claim snapshot
(scheduler.claim_cache) follows writes made in this process."""
from __future__ import annotations

import psycopg
import pytest

from lorry.scheduler import JobSpec, errors
from tests.integration.scheduler.conftest import migrated_pg_database


@pytest.fixture(scope="module")
def db_url():
    """This module's tests are about the PostgreSQL claim path only (no SQLite variant)."""
    with migrated_pg_database() as url:
        yield url


@pytest.fixture
def pg_queue(make_queue):
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
    x = pg_queue.register_adapter("x", "/adapters/x").id
    pg_queue.register_adapter("y", "/adapters/y")
    pg_queue.submit(t.id, [JobSpec("x", prompt=str(i)) for i in range(40)])
    assert {mb.adapter.name for mb in pg_queue.claim("w1", [x], [], free_slots=8)} == {"x"}
    # A new, higher-priority job right after: the next claim (within the cache's TTL) sees it.
    [urgent] = pg_queue.submit(t.id, [JobSpec("y", prompt="now", priority=5)])
    first = pg_queue.claim("w1", [x], [], free_slots=1)
    assert [j.id for mb in first for j in mb.jobs] == [urgent.id]
    # Cancelled queued jobs are not planned for: the claim is full, from what is left.
    rest = pg_queue.list_jobs(t.id, status="queued", limit=100)
    for job in rest[:20]:
        pg_queue.cancel(job.id, t.id)
    got = [j.id for mb in pg_queue.claim("w1", [x], [], free_slots=12) for j in mb.jobs]
    assert len(got) == 12 and not {j.id for j in rest[:20]} & set(got)


def test_a_claim_whose_reply_is_lost_gives_its_jobs_back(pg_queue, monkeypatch):
    """The claim commits on the server, then the connection dies before the reply: the worker
    never sees those jobs. The retry requeues them (attempt given back) before claiming
    again, so nothing waits for the lease to run out or fails at max_attempts=1."""
    from lorry.scheduler import claims
    t, _ = pg_queue.create_tenant("t")
    pg_queue.submit(t.id, [JobSpec(None, prompt=str(i), max_attempts=1) for i in range(10)])
    orig, lost = claims.claim_rows, []

    def reply_lost(cur, *a, **k):
        rows = orig(cur, *a, **k)                  # committed on the server (autocommit)
        if not lost:
            lost.append([r[rows.at["id"]] for r in rows.rows])
            cur.connection.close()                 # ... and the reply never arrives
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return rows
    monkeypatch.setattr(claims, "claim_rows", reply_lost)
    got = [j.id for mb in pg_queue.claim("w1", [], [], free_slots=4) for j in mb.jobs]
    assert len(lost[0]) == 4 and len(got) == 4
    running = {j.id for j in pg_queue.list_jobs(t.id, status="running", limit=100)}
    assert running == set(got)                      # only what the worker holds
    for job_id in lost[0]:
        if job_id not in got:
            info = pg_queue.get_job(job_id)
            assert info.status == "queued" and info.attempts == 0


def test_a_snapshot_read_during_an_uncommitted_submit_is_not_reused(pg_queue):
    """Another thread's submit has written queue_groups but not committed when a claim reads
    its snapshot; once it commits, the next claim reads again and sees the new job at once
    (not after the cache's TTL)."""
    import threading
    pg_queue.snapshot_ttl_seconds = 5.0
    t, _ = pg_queue.create_tenant("t")
    t2, _ = pg_queue.create_tenant("t2")
    pg_queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(100)])
    pg_queue.claim("w1", [], [], free_slots=1)
    in_txn, go_on = threading.Event(), threading.Event()

    def submitter():
        with pg_queue.engine.begin() as conn:
            pg_queue._submit(conn, t2.id, [JobSpec(None, prompt="urgent", priority=5)])
            in_txn.set()
            go_on.wait(10)
    th = threading.Thread(target=submitter)
    th.start()
    assert in_txn.wait(10)
    pg_queue.claim("w1", [], [], free_slots=1)      # snapshot without the uncommitted job
    go_on.set()
    th.join(10)
    got = [j.prompt for mb in pg_queue.claim("w1", [], [], free_slots=1) for j in mb.jobs]
    assert got == ["urgent"]


SUBMIT_ELSEWHERE = """
import sys
from lorry.scheduler import JobQueue, JobSpec
queue = JobQueue(sys.argv[1], create=False)
queue.submit(sys.argv[2], [JobSpec(sys.argv[3], prompt=f"small {i}") for i in range(5)])
queue.close()
"""


def test_a_tenant_that_another_process_submits_for_is_served_at_the_next_claim(
        make_queue, db_url):
    """A worker's cached snapshot does not show a tenant that became active through another
    process; the claim statement finds its group, leases nothing from the stale plan, and
    the claim is planned again from a fresh snapshot: no flood job goes first."""
    import subprocess
    import sys

    queue = make_queue(clock=None, snapshot_ttl_seconds=600)  # the cache alone never expires
    a, _ = queue.create_tenant("flooder")
    b, _ = queue.create_tenant("small")
    style = queue.register_adapter("style", "/adapters/a/style", tenant_id=a.id).id
    queue.register_adapter("style", "/adapters/b/style", tenant_id=b.id)
    queue.submit(a.id, [JobSpec("style", prompt=str(i)) for i in range(200)])
    assert {j.tenant_id for mb in queue.claim("w1", [style], [], free_slots=8)
            for j in mb.jobs} == {a.id}
    # Another process's submit (the API's): nothing in this process learns of it.
    run = subprocess.run([sys.executable, "-c", SUBMIT_ELSEWHERE, db_url, b.id, "style"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = [j.tenant_id for mb in queue.claim("w1", [style], [], free_slots=8) for j in mb.jobs]
    assert got.count(b.id) == 5 and len(got) == 8  # all of B's, the rest of the claim A's


def test_a_claim_aborted_by_a_deadlock_is_made_again(pg_queue, monkeypatch):
    """The driver's deadlock error leaves the connector as errors.Retryable; claim() makes
    the claim again (nothing was leased by the aborted one) and every job is leased once."""
    from lorry.scheduler import claims
    t, _ = pg_queue.create_tenant("t")
    pg_queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(10)])
    orig, aborted = claims.claim_rows, []

    def deadlocked_once(cur, *a, **k):
        if not aborted:
            aborted.append(1)
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return orig(cur, *a, **k)
    monkeypatch.setattr(claims, "claim_rows", deadlocked_once)
    got = [j.id for mb in pg_queue.claim("w1", [], [], free_slots=4) for j in mb.jobs]
    assert aborted and len(got) == len(set(got)) == 4
    running = pg_queue.list_jobs(t.id, status="running", limit=100)
    assert {j.id for j in running} == set(got) and {j.attempts for j in running} == {1}


def test_a_claim_aborted_every_time_raises_retryable_and_leases_nothing(pg_queue, monkeypatch):
    from lorry.scheduler import claims
    t, _ = pg_queue.create_tenant("t")
    pg_queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(10)])
    calls = []

    def always_aborted(cur, *a, **k):
        calls.append(1)
        raise psycopg.errors.SerializationFailure("could not serialize access")
    monkeypatch.setattr(claims, "claim_rows", always_aborted)
    with pytest.raises(errors.Retryable) as e:
        pg_queue.claim("w1", [], [], free_slots=4)
    assert isinstance(e.value.__cause__, psycopg.errors.SerializationFailure)
    assert len(calls) == claims.CLAIM_ATTEMPTS
    assert len(pg_queue.list_jobs(t.id, status="queued", limit=100)) == 10


def test_a_connection_lost_at_every_attempt_is_unavailable_and_leases_nothing(
        pg_queue, monkeypatch):
    """Each attempt's claim commits, then its connection dies before the reply: claim() gives
    the jobs back each time and finally raises errors.ConnectionLost (an Unavailable)."""
    from lorry.scheduler import claims
    t, _ = pg_queue.create_tenant("t")
    pg_queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(10)])
    orig = claims.claim_rows

    def reply_lost(cur, *a, **k):
        orig(cur, *a, **k)
        cur.connection.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")
    monkeypatch.setattr(claims, "claim_rows", reply_lost)
    with pytest.raises(errors.Unavailable) as e:
        pg_queue.claim("w1", [], [], free_slots=4)
    assert isinstance(e.value, errors.ConnectionLost)
    queued = pg_queue.list_jobs(t.id, status="queued", limit=100)
    assert len(queued) == 10 and {j.attempts for j in queued} == {0}
    monkeypatch.setattr(claims, "claim_rows", orig)
    assert len(pg_queue.claim("w1", [], [], free_slots=4)[0].jobs) == 4  # a new connection


def _swapped(sql: str, pairs: list[tuple[str, str]]) -> str:
    for a, b in pairs:
        assert sql.count(a) == 1, a
        sql = sql.replace(a, b)
    return sql


def test_claim_rows_decode_by_column_name(pg_queue, monkeypatch):
    """Columns of the same type change places in the claim and snapshot statements: the
    claimed jobs, their adapter and the planned groups come out the same (decoding by
    position would swap prompt and adapter name, and read the queued count as priority)."""
    from lorry.scheduler import queries
    t, _ = pg_queue.create_tenant("t")
    x = pg_queue.register_adapter("x", "/adapters/x", revision="r1")
    pg_queue.submit(t.id, [JobSpec("x", prompt=f"p{i}") for i in range(10)])
    monkeypatch.setattr(queries, "CLAIM_JOBS_PG", _swapped(queries.CLAIM_JOBS_PG, [
        ("c.adapter_name, c.prompt,", "c.prompt, c.adapter_name,"),
        ("a.name AS a_name, a.source AS a_source, a.revision AS a_revision",
         "a.revision AS a_revision, a.source AS a_source, a.name AS a_name")]))
    monkeypatch.setattr(queries, "CLAIM_SNAPSHOT_PG", _swapped(queries.CLAIM_SNAPSHOT_PG, [
        ("SELECT c.tenant_id, c.adapter_id, c.priority, c.queued_count,",
         "SELECT c.tenant_id, c.adapter_id, c.queued_count, c.priority,"),
        ("t.weight, t.served, s.*", "s.*, t.served, t.weight")]))
    [mb] = pg_queue.claim("w1", [], [], free_slots=4)
    assert (mb.adapter.id, mb.adapter.name, mb.adapter.source, mb.adapter.revision) == (
        x.id, "x", "/adapters/x", "r1")
    assert len(mb.jobs) == 4 and {(j.adapter, j.tenant_id) for j in mb.jobs} == {("x", t.id)}
    assert len({j.prompt for j in mb.jobs} & {f"p{i}" for i in range(10)}) == 4
