"""Driver errors leave the queue's connector as typed scheduler.errors, decided by the
driver's exception type: a deadlock or serialization failure is Retryable, a connection lost
mid-transaction is ConnectionLost (an Unavailable), a unique-key collision is DuplicateKey;
anything else propagates as the driver raised it."""
from __future__ import annotations

import threading

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from lorry.scheduler import JobSpec, errors
from tests.integration.scheduler.conftest import PG_URL

# PostgreSQL only: SQLite serializes its writers (no deadlock, no lost server connection)
pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def _nudge(conn, tenant_id: str) -> None:
    conn.execute(text("UPDATE tenants SET weight = weight WHERE id = :id"), {"id": tenant_id})


@pg_only
def test_a_deadlock_is_retryable(queue):
    a, _ = queue.create_tenant("a")
    b, _ = queue.create_tenant("b")
    both_locked = threading.Barrier(2, timeout=30)
    outcome: dict[str, object] = {}

    def transaction(name: str, first: str, second: str) -> None:
        try:
            with queue.connector.begin() as conn:
                _nudge(conn, first)
                both_locked.wait()
                _nudge(conn, second)  # each waits for the other's row: PostgreSQL aborts one
            outcome[name] = "committed"
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome[name] = e

    threads = [threading.Thread(target=transaction, args=("ab", a.id, b.id)),
               threading.Thread(target=transaction, args=("ba", b.id, a.id))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(map(str, outcome.values())).count("committed") == 1, outcome
    [aborted] = [e for e in outcome.values() if e != "committed"]
    assert isinstance(aborted, errors.Retryable), repr(aborted)
    assert isinstance(aborted.__cause__.orig, psycopg.errors.DeadlockDetected)


@pg_only
def test_a_serialization_failure_is_retryable_and_the_call_can_be_made_again(queue):
    t, _ = queue.create_tenant("t")

    def set_weight_after_a_concurrent_write(weight: float) -> None:
        with queue.connector.begin() as conn:
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute(text("SELECT weight FROM tenants WHERE id = :id"), {"id": t.id})
            if weight == 3.0:  # the first time only, another transaction changes the row
                with queue.connector.begin() as other:
                    other.execute(text("UPDATE tenants SET weight = 2 WHERE id = :id"),
                                  {"id": t.id})
            conn.execute(text("UPDATE tenants SET weight = :w WHERE id = :id"),
                         {"w": weight, "id": t.id})

    with pytest.raises(errors.Retryable) as e:
        set_weight_after_a_concurrent_write(3.0)
    assert isinstance(e.value.__cause__.orig, psycopg.errors.SerializationFailure)
    assert queue.get_tenant(t.id).weight == 2.0  # nothing of the aborted one applied
    set_weight_after_a_concurrent_write(4.0)
    assert queue.get_tenant(t.id).weight == 4.0


@pg_only
def test_a_connection_lost_mid_transaction_is_unavailable(queue):
    t, _ = queue.create_tenant("t")
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with pytest.raises(errors.Unavailable) as e, queue.connector.begin() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        _nudge(conn, t.id)
    assert isinstance(e.value, errors.ConnectionLost)
    assert str(e.value) == "the job database cannot be reached; try again later"
    assert queue.get_tenant(t.id).name == "t"  # the pool opened a new connection


def test_a_duplicate_idempotency_key_is_duplicate_key(queue):
    """Both dialects, and on PostgreSQL through COPY too (the bare driver's error): the
    unique index refuses a second job with the tenant's key."""
    from lorry.scheduler.jobs import COPY_MIN_ROWS, new_rows
    t, _ = queue.create_tenant("t")
    [job] = queue.submit(t.id, [JobSpec(None, prompt="a", idempotency_key="k")])
    specs = [JobSpec(None, prompt=str(i)) for i in range(COPY_MIN_ROWS - 1)]
    specs.append(JobSpec(None, prompt="b", idempotency_key="k"))
    with pytest.raises(errors.DuplicateKey), queue.connector.begin() as conn:
        rows: list = []
        new_rows(t.id, specs, {None: 0}, {}, rows, queue.now(), None, None, 0)
        queue._write(conn, rows)
    assert [j.id for j in queue.list_jobs(t.id, limit=100)] == [job.id]
    assert [j.id for j in queue.submit(t.id, [JobSpec(None, prompt="c",
                                                      idempotency_key="k")])] == [job.id]


def test_other_driver_errors_propagate_unchanged(queue):
    # NOT NULL: a bug, not an outage
    with pytest.raises(sa_exc.IntegrityError), queue.connector.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id) VALUES ('tenant_x')"))


@pg_only
def test_a_claim_that_fails_after_its_statement_gives_its_jobs_back(queue, monkeypatch):
    """The claim statement commits on its own; an error after it (here a deadlock while the
    micro-batches are built) must not leave its jobs leased to nobody while the retry leases
    others."""
    from lorry.scheduler.claims import ClaimOps
    from lorry.scheduler.connector import raise_typed

    t, _ = queue.create_tenant("t")
    queue.submit(t.id, [JobSpec(None, prompt=str(i)) for i in range(4)])
    real, calls = ClaimOps._micro_batches, []

    def once_deadlocked(self, conn, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            try:
                raise psycopg.errors.DeadlockDetected("deadlock detected")
            except psycopg.Error as e:
                raise_typed(e)
        return real(self, conn, *a, **k)
    monkeypatch.setattr(ClaimOps, "_micro_batches", once_deadlocked)
    got = {j.id for b in queue.claim("w", [], [], 2) for j in b.jobs}
    assert len(got) == 2 and len(calls) == 2
    with queue.engine.connect() as c:
        rows = c.execute(text("SELECT id, status FROM jobs")).all()
    assert {r.id for r in rows if r.status == "running"} == got   # none held by nobody


@pg_only
def test_a_claim_whose_connection_breaks_mid_statement_leaves_no_orphan(queue, monkeypatch):
    """The client loses the claim connection while the server still runs the statement
    (blocked on a lock): the server process is ended before the give-back, so whatever the
    statement did is visible to it; no job stays leased to nobody."""
    import os
    import socket
    import time

    import lorry.scheduler.claims as claims_mod

    t, _ = queue.create_tenant("t")
    queue.submit(t.id, [JobSpec(None, prompt=str(i), max_attempts=1) for i in range(4)])
    blocker = queue.engine.connect()
    blocker.execute(text("UPDATE tenants SET weight = weight WHERE id = :id"), {"id": t.id})
    real, calls = claims_mod.claim_rows, []

    def cut_then_run(cur, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            fd = cur.connection.fileno()

            def cut():
                time.sleep(0.5)
                s = socket.socket(fileno=os.dup(fd))
                s.shutdown(socket.SHUT_RDWR)
                s.close()
                time.sleep(1.0)
                blocker.commit()
            threading.Thread(target=cut, daemon=True).start()
        return real(cur, *a, **k)
    monkeypatch.setattr(claims_mod, "claim_rows", cut_then_run)
    got = {j.id for b in queue.claim("w", [], [], 2) for j in b.jobs}
    blocker.close()
    time.sleep(0.5)
    with queue.engine.connect() as c:
        rows = c.execute(text("SELECT id, status FROM jobs")).all()
    assert len(calls) >= 2
    assert {r.id for r in rows if r.status == "running"} == got
