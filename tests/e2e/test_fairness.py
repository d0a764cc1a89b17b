"""Tenant fairness through the real service (API, Celery worker on CPU, beat): a tenant that
submits a few jobs on its own cold adapter while another floods the queue on a hot adapter is
served within one engine's worth of the flooder's jobs, and then shares the worker evenly."""
from __future__ import annotations

import time

from sqlalchemy import create_engine, text

from lorry.client import Client
from lorry.scheduler.db import utcnow  # the queue's clock (naive UTC)
from tests.e2e.conftest import create_tenant

ROWS = 4  # LORRY_MAX_NUM_SEQS of the e2e worker
FLOOD, SMALL = 400, 10


def _lines(n: int, model: str, prefix: str) -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": f"{prefix} {i}", "max_tokens": 6,
                      "temperature": 0, "ignore_eos": True}} for i in range(n)]


def _claims(db, tenant_id: str) -> list:
    """(started_at, created_at) of the tenant's jobs that have started, in claim order."""
    with db.connect() as conn:
        return conn.execute(text(
            "SELECT j.started_at, j.created_at FROM jobs j WHERE j.tenant_id = :t AND "
            "j.started_at IS NOT NULL ORDER BY j.started_at"), {"t": tenant_id}).all()


def test_a_flood_does_not_starve_a_small_tenant(stack):
    flooder = Client(stack["api"], create_tenant(stack, "flooder"), timeout=60)
    small = Client(stack["api"], create_tenant(stack, "small"), timeout=60)
    db = create_engine(stack["env"]["LORRY_DATABASE_URL"])
    try:
        (_, path_a), (_, path_b) = sorted(stack["adapters"].items())
        flooder.add_adapter("hot", str(path_a))
        small.add_adapter("cold", str(path_b))
        flood = flooder.submit_batch(_lines(FLOOD, "hot", "a"))
        deadline = time.monotonic() + 120
        with db.connect() as conn:
            a_tenant = conn.execute(text("SELECT tenant_id FROM batches WHERE id = :b"),
                                    {"b": flood.id}).scalar_one()
        while len(_claims(db, a_tenant)) < 3 * ROWS and time.monotonic() < deadline:
            time.sleep(0.05)  # the flood is running: the worker holds the hot adapter
        batch = small.submit_batch(_lines(SMALL, "cold", "b"))
        # The jobs' created_at is when the submit began, before its transaction committed;
        # claims made while it was being written could not see them. Count from a moment
        # the batch was surely visible: the answer's arrival.
        visible = utcnow()
        small.wait_batch(batch.id, timeout=300)
        with db.connect() as conn:
            b_tenant = conn.execute(text("SELECT tenant_id FROM batches WHERE id = :b"),
                                    {"b": batch.id}).scalar_one()
        b_claims = _claims(db, b_tenant)
        assert len(b_claims) == SMALL
        submitted = min(created for _, created in b_claims)
        assert submitted <= visible
        first_b, last_b = b_claims[0][0], b_claims[-1][0]
        a_starts = [started for started, _ in _claims(db, a_tenant)]
        before_first = [s for s in a_starts if visible <= s < first_b]
        during = [s for s in a_starts if first_b <= s <= last_b]
        # served within one engine's worth of the flooder's jobs ...
        inside = [s for s in a_starts if submitted <= s < min(visible, first_b)]
        assert len(before_first) <= ROWS, (len(before_first), "claimed during the submit",
                                           len(inside))
        # ... and then an even share: the flooder does not run ahead while it waits
        assert len(during) <= SMALL + 2 * ROWS, len(during)
        # the flood was still queued when the small tenant's last job started (not vacuous)
        assert len([s for s in a_starts if s <= last_b]) < FLOOD
    finally:
        flooder.close()
        small.close()
        db.dispose()
