"""PostgreSQL claim: a read-only snapshot statement (cached between claims, see
scheduler.claim_cache) and one statement that leases the planned jobs (FOR UPDATE SKIP
LOCKED) and updates the summary, fair-share and worker rows. Both run on the bare psycopg
cursor (prepared; rows as tuples): SQLAlchemy's compile and row layers cost more client
time than the server spends on them."""
from __future__ import annotations

import json

from lorry.scheduler.claim_cache import GENERATION, ClaimSnapshot
from lorry.scheduler.db import epoch_seconds
from lorry.scheduler.policy import Group

HEARTBEAT_REFRESH_S = 5.0  # a claim rewrites an unchanged worker row at most this often


def _compact(sql: str) -> str:
    """The statement without comment lines and indentation: psycopg caches the conversion
    of statements up to 4,096 characters only (a longer one is re-parsed at every call)."""
    lines = (line.strip() for line in sql.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


# Data-modifying CTEs run once and to completion whether or not the final SELECT reads them.
# `picked` is materialized so the SKIP LOCKED subquery runs exactly once per group.
#
# `cfg` makes this statement's own (implicit) transaction commit asynchronously: the claim
# does not wait for its WAL flush. Safe: a claim lost in a server crash never happened, so
# its jobs are still queued and run again (at-least-once); the worker's complete() for them
# is fenced by a lease token that no longer exists and changes nothing. WAL is flushed in
# order, so a completion (synchronous commit) being durable implies its claim is durable.
CLAIM_SQL = """
WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS v),
want AS MATERIALIZED (
  SELECT w.* FROM cfg, unnest(CAST(%(tenants)s AS text[]), CAST(%(adapters)s AS bigint[]),
                              CAST(%(priorities)s AS int[]), CAST(%(counts)s AS int[]))
         AS w(tenant_id, adapter_id, priority, n)),
unseen AS MATERIALIZED (
  -- Among the groups that went live last (since shortly before the worker's snapshot was
  -- read), one the snapshot cannot show (a tenant it does not know, a higher priority):
  -- another process's submit. The plan may pass it over, so nothing is leased; the
  -- worker plans again from a fresh snapshot.
  SELECT EXISTS (SELECT 1 FROM (
    SELECT tenant_id, priority FROM queue_groups
    WHERE queued_count > 0 AND oldest_enqueued_at > %(since)s
    ORDER BY oldest_enqueued_at DESC LIMIT 64) u
    WHERE strpos(%(known)s, ',' || u.tenant_id || ',') = 0 OR u.priority > %(top)s) AS found),
picked AS MATERIALIZED (
  -- The groups in the plan's order until %(total)s rows: the Limit stops pulling, so a spare
  -- group is read (and its rows locked) only when the groups before it came short.
  SELECT p.id FROM want CROSS JOIN LATERAL (
    SELECT j.id FROM jobs j
    WHERE j.status = 'queued' AND j.tenant_id = want.tenant_id
      AND j.adapter_id = want.adapter_id AND j.priority = want.priority
      AND j.enqueued_at <= %(now)s AND (j.deadline IS NULL OR j.deadline > %(now)s)
    ORDER BY j.enqueued_at LIMIT want.n FOR UPDATE SKIP LOCKED) p
  WHERE NOT (SELECT found FROM unseen)
  LIMIT %(total)s),
claimed AS (
  -- By primary key only. Joined to picked, the generic plan (which cannot know that picked
  -- holds at most %(total)s rows) may hash the whole jobs table (~20 ms a claim at 100k
  -- queued); with status = 'queued' here, it may scan every queued job's index entry.
  -- picked locked each row after checking that it is queued (its WHERE, rechecked on the
  -- latest version), so nothing else can change the row before this UPDATE.
  UPDATE jobs SET status = 'running', worker_id = %(worker)s, lease_token = %(token)s,
         lease_expires_at = %(expires)s, attempts = jobs.attempts + 1, not_before = NULL,
         started_at = COALESCE(jobs.started_at, %(now)s)
  WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))
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
  RETURNING g.tenant_id, g.adapter_id, g.priority, g.queued_count, g.oldest_enqueued_at),
served AS (
  UPDATE tenants t SET served = GREATEST(t.served, %(floor)s) + s.n / GREATEST(t.weight, 1e-9)
  FROM (SELECT tenant_id, sum(n) AS n FROM per_group GROUP BY tenant_id) s
  WHERE t.id = s.tenant_id
  RETURNING t.id, t.served),
nexts AS (
  -- Each wanted tenant's oldest live group not claimed from here (as of this statement's
  -- start), so the worker's cached snapshot keeps a group for every tenant with work.
  SELECT x.* FROM (SELECT DISTINCT tenant_id FROM want) s CROSS JOIN LATERAL (
    SELECT g.tenant_id, g.adapter_id, g.priority, g.queued_count, g.oldest_enqueued_at
    FROM queue_groups g
    WHERE g.tenant_id = s.tenant_id AND g.queued_count > 0 AND NOT EXISTS (
      SELECT 1 FROM per_group pg WHERE pg.tenant_id = g.tenant_id
        AND pg.adapter_id = g.adapter_id AND pg.priority = g.priority)
    ORDER BY g.oldest_enqueued_at LIMIT 1) x),
me AS (
  -- Only when the snapshot found the worker row stale (caches changed, heartbeat old).
  INSERT INTO workers (id, heartbeat_at, hot, warm, capacity)
  SELECT %(worker)s, %(now)s, CAST(%(hot)s AS json), CAST(%(warm)s AS json), 0 WHERE %(touch)s
  ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, hot = excluded.hot,
                                 warm = excluded.warm
  RETURNING 1)
-- With the adapter's row (NULL: base model, or deleted), so no second round trip reads it.
-- sampling as text: jobs of one submit usually share it, so the client decodes it once.
SELECT c.id, c.tenant_id, c.adapter_id, c.adapter_name, c.prompt, c.messages, c.sampling::text,
       c.attempts, c.priority, c.enqueued_at, a.id, a.name, a.source, a.revision, a.tenant_id,
       a.rank, a.status, a.base_model, a.created_at,
       -- Once (an InitPlan), repeated on every row: the claimed groups as this claim left
       -- them, the wanted tenants' next groups, and the served tenants' counters.
       (SELECT json_build_array(
          (SELECT json_agg(json_build_array(
                    z.tenant_id, z.adapter_id, z.priority, z.queued_count,
                    extract(epoch FROM z.oldest_enqueued_at)))
           FROM (SELECT * FROM groups UNION ALL SELECT * FROM nexts) z),
          (SELECT json_agg(json_build_array(id, served)) FROM served)))::text
FROM claimed c LEFT JOIN adapters a ON a.id = c.adapter_id
"""
CLAIM_SQL = _compact(CLAIM_SQL)

TOUCH_SQL = """
INSERT INTO workers (id, heartbeat_at, hot, warm, capacity)
VALUES (%(worker)s, %(now)s, CAST(%(hot)s AS json), CAST(%(warm)s AS json), 0)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, hot = excluded.hot,
                               warm = excluded.warm
"""


def claim_rows(cur, wants, total, *, now, worker_id, token, expires, floor, touch, hot,
               warm, unseen: dict) -> list:
    """Lease up to total jobs from the wanted (group, count) pairs, in their order (and
    rewrite the worker row when touch); returns the claimed
    jobs as tuples (id, tenant_id, adapter_id, adapter_name, prompt, messages, sampling JSON text,
    attempts, priority, enqueued_at, then the adapter's id, name, source, revision,
    tenant_id, rank, status, base_model, created_at, then the JSON text [groups, served]
    (see the statement). Nothing is leased when a group matches unseen (since, known, top:
    see ClaimSnapshot.unseen_filter). cur: a psycopg cursor (autocommit)."""
    cur.execute(CLAIM_SQL, dict(
        tenants=[g.tenant_id for g, _ in wants], adapters=[g.adapter_id for g, _ in wants],
        priorities=[g.priority for g, _ in wants], counts=[n for _, n in wants], total=total,
        token=token, expires=expires, floor=floor, touch=touch, worker=worker_id, now=now,
        hot=json.dumps(hot), warm=json.dumps(warm), **unseen), prepare=True)
    return cur.fetchall()


def touch_worker(cur, worker_id, now, hot, warm) -> None:
    """Record the worker's caches and heartbeat (a claim that leased nothing)."""
    cur.execute(TOUCH_SQL, dict(worker=worker_id, now=now, hot=json.dumps(hot),
                                warm=json.dumps(warm)))


# Everything a claim reads, in one read-only autocommit round trip (no WAL flush): the
# worker's hot/warm ids that name existing adapters and its stored row (engine rows
# included), the hot lists of the other live workers, and the candidate groups with their
# tenant's weight and fair-share counter (one row per group; a single row with NULL group
# columns when nothing is queued).
SNAPSHOT_SQL = """
WITH hot_ids AS (SELECT id FROM adapters WHERE id = ANY(CAST(%(hot_ids)s AS bigint[]))),
warm_ids AS (SELECT id FROM adapters WHERE id = ANY(CAST(%(warm_ids)s AS bigint[]))),
cand AS (
  (SELECT tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0 ORDER BY oldest_enqueued_at LIMIT %(overdue)s)
  UNION
  (SELECT tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0 AND priority > 0
   ORDER BY priority DESC, oldest_enqueued_at LIMIT %(by_priority)s)
  UNION
  (SELECT tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0
     AND adapter_id IN (SELECT id FROM hot_ids UNION SELECT id FROM warm_ids))
  UNION
  -- Each tenant's oldest group: one pass over the live groups (their number does not grow
  -- with the queued jobs), cheaper than an index probe per tenant.
  (SELECT DISTINCT ON (tenant_id) tenant_id, adapter_id, priority, queued_count,
          oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0 ORDER BY tenant_id, oldest_enqueued_at)),
me AS (SELECT hot, warm, heartbeat_at, capacity FROM workers WHERE id = %(worker)s)
SELECT c.tenant_id, c.adapter_id, c.priority, c.queued_count, c.oldest_enqueued_at,
       t.weight, t.served, s.*
FROM (SELECT ARRAY(SELECT id FROM hot_ids ORDER BY id) AS hot,
             ARRAY(SELECT id FROM warm_ids ORDER BY id) AS warm,
             -- JSON as text, repeated on every row but parsed once (from the first row).
             (SELECT json_agg(w.hot) FROM workers w
              WHERE w.id <> %(worker)s AND w.heartbeat_at > %(live_after)s)::text AS others,
             (SELECT hot::text FROM me) AS me_hot, (SELECT warm::text FROM me) AS me_warm,
             (SELECT heartbeat_at FROM me) AS me_beat,
             (SELECT capacity FROM me) AS me_capacity) s
LEFT JOIN (cand c JOIN tenants t ON t.id = c.tenant_id) ON true
"""
SNAPSHOT_SQL = _compact(SNAPSHOT_SQL)


def read_snapshot(cur, worker_id, hot, warm, *, now, live_after, overdue, by_priority,
                  mono) -> ClaimSnapshot:
    """The snapshot (PER_TENANT is 1 here: DISTINCT ON keeps one group per tenant). hot,
    warm: the worker's adapters as AdapterInfo ids."""
    hot_ids, warm_ids = list(hot or ()), list(warm or ())
    generation = GENERATION[0]  # before reading: a write racing the read forces a refresh
    cur.execute(SNAPSHOT_SQL, {
        "hot_ids": hot_ids, "warm_ids": warm_ids, "worker": worker_id,
        "live_after": live_after, "overdue": overdue, "by_priority": by_priority},
        prepare=True)
    rows = cur.fetchall()
    first = rows[0]
    far = epoch_seconds(now) + 1e9
    groups, weights, served = {}, {}, {}
    for r in rows:
        if r[0] is None:
            continue  # nothing queued: the one row with NULL group columns
        g = Group(r[0], r[1], r[2], r[3], epoch_seconds(r[4]) if r[4] is not None else far)
        groups[g.key] = g
        weights[r[0]], served[r[0]] = r[5], r[6]
    me_hot, me_warm, me_beat = first[10], first[11], first[12]
    written = None if me_beat is None else (json.loads(me_hot or "[]"),
                                            json.loads(me_warm or "[]"), me_beat)
    hot_list, warm_list = list(first[7]), list(first[8])
    others = json.loads(first[9] or "[]")  # one hot list per other live worker
    return ClaimSnapshot(
        groups=groups, weights=weights, served=served, known=f",{','.join(weights)},",
        top=max((g.priority for g in groups.values()), default=-(2 ** 31)),
        others={x for lst in others for x in lst or [] if isinstance(x, int)},
        workers=1 + len(others), capacity=first[13] or 0,
        refs=(tuple(hot or ()), tuple(warm or ())), hot=hot_list, warm=warm_list,
        written=written, read_at=now, read_mono=mono, generation=generation,
        read_at_epoch=epoch_seconds(now),
        existing=set(hot_list) | set(warm_list), requested=set(hot_ids) | set(warm_ids))
