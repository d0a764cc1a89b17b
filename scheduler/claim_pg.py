"""PostgreSQL claim in one statement: lease the planned jobs of every chosen group with
FOR UPDATE SKIP LOCKED and update the queue summary and fair-share counters alongside."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

HEARTBEAT_REFRESH_S = 5.0  # a claim rewrites an unchanged worker row at most this often

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


# Everything a claim reads, in one autocommit round trip: records the worker (heartbeat,
# hot/warm resolved to ids) and returns the candidate groups with their tenant's weight and
# fair-share counter, the worker's hot/warm ids, and the hot lists of the other live workers.
SNAPSHOT_SQL = text("""
WITH hot_ids AS (
  SELECT id FROM adapters WHERE id = ANY(CAST(:hot_ids AS bigint[]))
                             OR name = ANY(CAST(:hot_names AS text[]))),
warm_ids AS (
  SELECT id FROM adapters WHERE id = ANY(CAST(:warm_ids AS bigint[]))
                             OR name = ANY(CAST(:warm_names AS text[]))),
me AS (
  INSERT INTO workers (id, heartbeat_at, hot, warm, capacity)
  VALUES (:worker, :now,
          (SELECT coalesce(json_agg(id ORDER BY id), '[]'::json) FROM hot_ids),
          (SELECT coalesce(json_agg(id ORDER BY id), '[]'::json) FROM warm_ids), 0)
  ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, hot = excluded.hot,
                                 warm = excluded.warm
  -- Write (and flush WAL) only when the caches changed or the heartbeat is getting old.
  WHERE workers.hot::text <> excluded.hot::text OR workers.warm::text <> excluded.warm::text
     OR workers.heartbeat_at < :refresh_before
  RETURNING 1),
cand AS (
  (SELECT tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0 ORDER BY oldest_enqueued_at LIMIT :overdue)
  UNION
  (SELECT tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0 AND priority > 0
   ORDER BY priority DESC, oldest_enqueued_at LIMIT :by_priority)
  UNION
  (SELECT tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0
     AND adapter_id IN (SELECT id FROM hot_ids UNION SELECT id FROM warm_ids))
  UNION
  (SELECT g.tenant_id, g.adapter_id, g.priority, g.queued_count, g.oldest_enqueued_at
   FROM tenants t CROSS JOIN LATERAL (
     SELECT * FROM queue_groups q WHERE q.queued_count > 0 AND q.tenant_id = t.id
     ORDER BY q.oldest_enqueued_at LIMIT :per_tenant) g))
SELECT c.tenant_id, c.adapter_id, c.priority, c.queued_count, c.oldest_enqueued_at,
       t.weight, t.served,
       ARRAY(SELECT id FROM hot_ids) AS hot, ARRAY(SELECT id FROM warm_ids) AS warm,
       (SELECT json_agg(w.hot) FROM workers w
        WHERE w.id <> :worker AND w.heartbeat_at > :live_after) AS others
FROM cand c JOIN tenants t ON t.id = c.tenant_id
""")


def snapshot_rows(conn, worker_id, hot, warm, *, now, live_after, overdue, by_priority,
                  per_tenant) -> list:
    def split(refs):
        refs = list(refs or [])
        return ([x for x in refs if isinstance(x, int)], [x for x in refs if isinstance(x, str)])

    (hot_ids, hot_names), (warm_ids, warm_names) = split(hot), split(warm)
    return conn.execute(SNAPSHOT_SQL, {
        "hot_ids": hot_ids, "hot_names": hot_names, "warm_ids": warm_ids,
        "warm_names": warm_names, "worker": worker_id, "now": now, "live_after": live_after,
        "overdue": overdue, "by_priority": by_priority, "per_tenant": per_tenant,
        "refresh_before": now - timedelta(seconds=HEARTBEAT_REFRESH_S)}).all()
