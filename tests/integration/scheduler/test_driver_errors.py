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
