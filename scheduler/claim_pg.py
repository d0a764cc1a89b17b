"""PostgreSQL claim in one statement: lease the planned jobs of every chosen group with
FOR UPDATE SKIP LOCKED and update the queue summary and fair-share counters alongside."""
from __future__ import annotations

from sqlalchemy import text

# Data-modifying CTEs run once and to completion whether or not the final SELECT reads them.
# `picked` is materialized so the SKIP LOCKED subquery runs exactly once per group.
CLAIM_SQL = text("""
WITH want AS (
  SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:adapters AS bigint[]),
                       CAST(:priorities AS int[]), CAST(:counts AS int[]))
         AS w(tenant_id, adapter_id, priority, n)),
picked AS MATERIALIZED (
  SELECT p.id FROM want CROSS JOIN LATERAL (
    SELECT j.id FROM jobs j
    WHERE j.status = 'queued' AND j.tenant_id = want.tenant_id
      AND j.adapter_id = want.adapter_id AND j.priority = want.priority
      AND j.enqueued_at <= :now AND (j.deadline IS NULL OR j.deadline > :now)
    ORDER BY j.enqueued_at LIMIT want.n FOR UPDATE SKIP LOCKED) p),
claimed AS (
  UPDATE jobs SET status = 'running', worker_id = :worker, lease_token = :token,
         lease_expires_at = :expires, attempts = jobs.attempts + 1, not_before = NULL,
         started_at = COALESCE(jobs.started_at, :now)
  FROM picked WHERE jobs.id = picked.id AND jobs.status = 'queued'
  RETURNING jobs.id, jobs.tenant_id, jobs.adapter_id, jobs.priority, jobs.adapter_name,
            jobs.prompt, jobs.messages, jobs.sampling, jobs.attempts, jobs.enqueued_at),
per_group AS (
  SELECT tenant_id, adapter_id, priority, count(*) AS n, max(enqueued_at) AS last
  FROM claimed GROUP BY tenant_id, adapter_id, priority),
groups AS (
  -- The group's next job is no older than the last one claimed (a cheap lower bound).
  UPDATE queue_groups g SET queued_count = g.queued_count - pg.n,
         oldest_enqueued_at = GREATEST(g.oldest_enqueued_at, pg.last)
  FROM per_group pg WHERE g.tenant_id = pg.tenant_id AND g.adapter_id = pg.adapter_id
    AND g.priority = pg.priority
  RETURNING 1),
served AS (
  UPDATE tenants t SET served = GREATEST(t.served, :floor) + s.n / GREATEST(t.weight, 1e-9)
  FROM (SELECT tenant_id, sum(n) AS n FROM per_group GROUP BY tenant_id) s
  WHERE t.id = s.tenant_id
  RETURNING 1)
SELECT id, tenant_id, adapter_id, adapter_name, prompt, messages, sampling, attempts
FROM claimed
""")


def claim_rows(conn, takes, *, now, worker_id, token, expires, floor) -> list:
    """Lease the planned takes; returns the claimed job rows."""
    return conn.execute(CLAIM_SQL, dict(
        tenants=[t.group.tenant_id for t in takes], adapters=[t.group.adapter_id for t in takes],
        priorities=[t.group.priority for t in takes], counts=[t.count for t in takes],
        now=now, worker=worker_id, token=token, expires=expires, floor=floor)).all()
