"""A PostgreSQL server frozen while the queue's connections stay open (SIGSTOP, a hung host
whose kernel still acknowledges TCP), played by a proxy in front of the real server that stops
forwarding with its sockets open: calls end as Unavailable (the API's 503) within the
statement deadline plus its grace, the pools recover once it answers again, and a slow but
alive statement is cancelled by the server's statement_timeout."""
from __future__ import annotations

import threading

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from lorry.scheduler import JobQueue, JobSpec, errors
from lorry.scheduler.deadline import SWEEP_S, client_limit
from tests.integration.scheduler.conftest import migrated_pg_database
from tests.net import freezable_proxy

DEADLINE_S = 2.0
CONNECT_TIMEOUT_S = 2   # libpq's least: a new connection to the frozen server gives up after it
# A call on a frozen server may wait out the client limit on an open connection (the pool's
# pre-ping), then a new connection's connect_timeout; the rest is a loaded machine's slack.
BOUND_S = client_limit(DEADLINE_S) + SWEEP_S + CONNECT_TIMEOUT_S + 10


@pytest.fixture(scope="module")
def pg_url():
    with migrated_pg_database() as url:
        yield url


@pytest.fixture
def proxy(pg_url):
    url = make_url(pg_url)
    with freezable_proxy((url.host, url.port or 5432)) as p:
        yield p


@pytest.fixture
def queue(pg_url, proxy):
    """A queue reaching the module's database through the proxy, with a 2 s deadline."""
    url = make_url(pg_url).set(host="127.0.0.1", port=proxy.port,
                               query={"connect_timeout": str(CONNECT_TIMEOUT_S)})
    q = JobQueue(url.render_as_string(hide_password=False), create=False,
                 statement_timeout_seconds=DEADLINE_S)
    yield q
    q.close()


def outcome_of(calls: dict, bound_s: float = BOUND_S) -> dict:
    """Run each call in a thread of its own; what each returned or raised, or "hung" for one
    still running after bound_s (a daemon thread, so a regression fails, not hangs)."""
    outcome = {name: "hung" for name in calls}

    def run(name, call):
        try:
            outcome[name] = call()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome[name] = e

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(bound_s)
    return outcome


def test_calls_on_a_frozen_server_are_unavailable_and_the_queue_recovers(queue, proxy):
    tenant, _ = queue.create_tenant("t")
    assert queue.claim("w1", [], [], 8) == []  # the claims' own pool has its connection open
    [job] = queue.submit(tenant.id, [JobSpec(adapter=None, prompt="p")])
    assert queue.get_job(job.id, tenant.id).status == "queued"

    proxy.freeze()
    # (the read and the submit wait in the pool's pre-ping, the claim in its statement)
    outcome = outcome_of({"read": lambda: queue.get_job(job.id, tenant.id),
                          "claim": lambda: queue.claim("w1", [], [], 8),
                          "submit": lambda: queue.submit(tenant.id, [JobSpec(None, "q")])})
    proxy.thaw()
    assert all(isinstance(e, errors.Unavailable) for e in outcome.values()), outcome

    # the same queue works again: nothing the cut calls sent was kept, the job is claimed once
    assert queue.get_job(job.id, tenant.id).status == "queued"
    assert [j.prompt for j in queue.list_jobs(tenant.id)] == ["p"]
    [claimed] = [j for mb in queue.claim("w1", [], [], 8) for j in mb.jobs]
    assert claimed.id == job.id
    assert queue.claim("w1", [], [], 8) == []


def test_a_transaction_cut_by_the_deadline_is_rolled_back(queue, proxy):
    tenant, _ = queue.create_tenant("t")
    weight = text("SELECT weight FROM tenants WHERE id = :id")
    written = {}

    def transaction():
        with queue.connector.begin() as conn:
            conn.execute(text("UPDATE tenants SET weight = 5 WHERE id = :id"), {"id": tenant.id})
            written["update"] = True
            proxy.freeze()
            conn.execute(weight, {"id": tenant.id})

    outcome = outcome_of({"transaction": transaction})
    proxy.thaw()
    assert written and isinstance(outcome["transaction"], errors.ConnectionLost), outcome
    # the server rolled the transaction back: its row lock is gone (a write of the row is
    # not cancelled by the deadline waiting for it) and the value is the old one
    with queue.connector.begin() as conn:
        assert conn.execute(weight, {"id": tenant.id}).scalar_one() == 1.0
        conn.execute(text("UPDATE tenants SET weight = 7 WHERE id = :id"), {"id": tenant.id})
    with queue.connector.connect() as conn:
        assert conn.execute(weight, {"id": tenant.id}).scalar_one() == 7.0


def test_the_api_answers_503_while_the_server_is_frozen(queue, proxy, pg_url, tmp_path):
    from lorry.api.app import create_app
    from lorry.settings import Settings

    settings = Settings(database_url=pg_url, data_dir=tmp_path, model=str(tmp_path),
                        database_statement_timeout_seconds=DEADLINE_S)
    _, key = queue.create_tenant("api")
    app = create_app(settings, queue=queue, nudger=None, redis_client=None)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        assert client.get("/v1/jobs").status_code == 200
        proxy.freeze()
        outcome = outcome_of({"list": lambda: client.get("/v1/jobs")})
        proxy.thaw()
        r = outcome["list"]
        assert not isinstance(r, (str, Exception)), outcome
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "database_unavailable"
        assert client.get("/v1/jobs").status_code == 200


def test_a_slow_statement_is_cancelled_by_the_server_and_a_quick_one_runs(queue):
    sleep = text("SELECT pg_sleep(:s)")

    def slow():
        with queue.connector.connect() as conn:
            conn.execute(sleep, {"s": DEADLINE_S * 2})

    outcome = outcome_of({"slow": slow})
    cancelled = outcome["slow"]
    assert isinstance(cancelled, errors.Unavailable), outcome
    # the server's statement_timeout, not the client's cut: the connection stays usable
    assert not isinstance(cancelled, errors.ConnectionLost)
    assert isinstance(cancelled.__cause__.orig, psycopg.errors.QueryCanceled)
    with queue.connector.connect() as conn:
        conn.execute(sleep, {"s": DEADLINE_S / 4})
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "2s"


def test_the_setting_reaches_the_queue_the_app_builds(pg_url, tmp_path):
    from lorry.api.app import create_app
    from lorry.settings import Settings

    settings = Settings(database_url=pg_url, data_dir=tmp_path, model=str(tmp_path),
                        database_statement_timeout_seconds=3)
    queue = create_app(settings, nudger=None, redis_client=None).state.queue
    try:
        with queue.connector.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "3s"
    finally:
        queue.close()


def test_a_longer_timeout_of_the_urls_own_is_not_cut_by_the_watchdog(pg_url):
    # the URL's options keep their statement_timeout (10 s); the client limit follows it, so
    # a 2 s deadline's watchdog does not cut a statement the server lets run
    url = make_url(pg_url).set(query={"options": "-c statement_timeout=10s"})
    q = JobQueue(url.render_as_string(hide_password=False), create=False,
                 statement_timeout_seconds=1.0)
    try:
        with q.connector.connect() as conn:
            conn.execute(text("SELECT pg_sleep(:s)"), {"s": client_limit(1.0) + 2 * SWEEP_S})
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "10s"
    finally:
        q.close()


def test_a_batch_ingest_runs_without_the_servers_statement_timeout(queue):
    # the ingest keeps one COPY open while it parses lines (PostgreSQL counts that against
    # statement_timeout): its transaction lifts the server's limit
    from lorry.scheduler.batch_writer import BatchWriter

    tenant, _ = queue.create_tenant("ingest")
    with queue.connector.begin() as conn:
        BatchWriter(queue, conn, tenant, "batch_x", None)
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "0"
    with queue.connector.connect() as conn:             # a later transaction has it again
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "2s"
