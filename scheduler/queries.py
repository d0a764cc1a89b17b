"""Every SQL statement of the job queue: SQLAlchemy Core builders (SQLite and PostgreSQL) and
the hand-written PostgreSQL statements of the hot paths (claim, snapshot, bulk results, COPY).
Each result column has a name of its own; callers decode rows by name, never by position."""
from __future__ import annotations

from sqlalchemy import (
    bindparam,
    case,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    union,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from lorry.scheduler.models import (
    Adapter,
    Batch,
    BatchReject,
    File,
    FileChunk,
    Job,
    MaintenanceRun,
    QueueGroup,
    Tenant,
    Worker,
)

T, A, J, G, W = (Tenant.__table__, Adapter.__table__, Job.__table__, QueueGroup.__table__,
                 Worker.__table__)
B, R, F, C, M = (Batch.__table__, BatchReject.__table__, File.__table__, FileChunk.__table__,
                 MaintenanceRun.__table__)


def _insert(dialect: str):
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _compact(sql: str) -> str:
    """The statement without comment lines and indentation: psycopg caches the conversion
    of statements up to 4,096 characters only (a longer one is re-parsed at every call)."""
    lines = (line.strip() for line in sql.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


# ---- connection set-up ------------------------------------------------------------------------
SQLITE_CONNECT = ("PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=30000",
                  "PRAGMA foreign_keys=ON")
SQLITE_BEGIN = "BEGIN IMMEDIATE"  # one writer at a time: a claim is a serialized transaction
# The claim and snapshot statements are prepared; their custom plans took longer to make
# (~1 ms) than to run. Their plans do not depend on the parameters' values (index probes per
# group), so one generic plan serves.
PG_CLAIM_CONNECT = "SET plan_cache_mode = force_generic_plan"

# ---- tenants -----------------------------------------------------------------------------------
INSERT_TENANT = T.insert()
ALL_TENANTS = select(T).order_by(T.c.created_at, T.c.id)


def tenant(tenant_id: str):
    return select(T).where(T.c.id == tenant_id)


def tenants(tenant_ids: list[str]):
    return select(T).where(T.c.id.in_(tenant_ids))


def tenant_by_key_id(key_id: str):
    return select(T).where(T.c.key_id == key_id)


def tenant_exists(tenant_id: str):
    return select(T.c.id).where(T.c.id == tenant_id)


def set_tenant_key(tenant_id: str, key_id: str, key_hash: str):
    return update(T).where(T.c.id == tenant_id).values(key_id=key_id, key_hash=key_hash)


# ---- adapters ----------------------------------------------------------------------------------
INSERT_ADAPTER = A.insert().returning(A.c.id)
ADAPTER_NAMES = select(A.c.id, A.c.name)


def adapter_id(tenant_key: str, name: str):
    return select(A.c.id).where(A.c.tenant_key == tenant_key, A.c.name == name)


def adapters_named(name: str, tenant_keys: list[str]):
    return select(A).where(A.c.name == name, A.c.tenant_key.in_(tenant_keys))


def visible_adapters(tenant_key: str):
    """The shared adapters and the tenant's own, by name (the tenant's first)."""
    return (select(A).where(or_(A.c.tenant_key == "", A.c.tenant_key == tenant_key))
            .order_by(A.c.name, A.c.tenant_key.desc()))


def delete_adapter(name: str, tenant_key: str):
    return delete(A).where(A.c.name == name, A.c.tenant_key == tenant_key)


def adapter_refs(names, tenant_keys: list[str]):
    """What a submit needs of the named adapters owned by these tenant keys."""
    return select(A.c.name, A.c.id, A.c.tenant_key, A.c.status).where(
        A.c.name.in_(names), A.c.tenant_key.in_(tenant_keys))


def adapters(ids: list[int]):
    return select(A).where(A.c.id.in_(ids))


# ---- queue_groups ------------------------------------------------------------------------------
# queue_groups += count per (tenant, adapter, priority), arrays as parameters: compiling a
# multi-row VALUES of a thousand groups costs more client time than the statement's run.
ADD_TO_GROUPS_PG = text("""
INSERT INTO queue_groups AS g (tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at)
SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:adapters AS bigint[]),
                     CAST(:priorities AS int[]), CAST(:counts AS int[]),
                     CAST(:oldest AS timestamp[]))
ON CONFLICT (tenant_id, adapter_id, priority) DO UPDATE SET
  queued_count = g.queued_count + excluded.queued_count,
  oldest_enqueued_at = CASE WHEN g.queued_count <= 0 OR g.oldest_enqueued_at IS NULL
                              OR excluded.oldest_enqueued_at < g.oldest_enqueued_at
                            THEN excluded.oldest_enqueued_at ELSE g.oldest_enqueued_at END
""")


def add_to_groups_sqlite(rows: list[dict]):
    """ADD_TO_GROUPS_PG as one multi-row upsert (the rows' keys are distinct)."""
    stmt = sqlite.insert(G).values(rows)
    exc = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["tenant_id", "adapter_id", "priority"],
        set_={
            "queued_count": G.c.queued_count + exc.queued_count,
            "oldest_enqueued_at": case(
                (G.c.queued_count <= 0, exc.oldest_enqueued_at),
                (G.c.oldest_enqueued_at.is_(None), exc.oldest_enqueued_at),
                (exc.oldest_enqueued_at < G.c.oldest_enqueued_at, exc.oldest_enqueued_at),
                else_=G.c.oldest_enqueued_at)})


# the seed of the quota lock's 64-bit key (hashtextextended(tenant id, seed)): one key a
# tenant, and two tenants' keys collide with a 2^-64 chance (a 32-bit hash let two tenants
# share one lock, and two submits that lock tenants in id order could then deadlock)
QUOTA_LOCK_SEED = 0x4C6F7271
STORAGE_LOCK_SEED = 0x4C6F7246
ADAPTERS_LOCK_SEED = 0x4C6F7241


def quota_lock(tenant_id: str):
    """PostgreSQL: hold, until the transaction ends, the lock that makes a tenant's quota
    check and its new rows one step (submits of the tenant wait on one another; claims,
    which take no such lock, do not wait). Not a row lock on the tenant: a claim updates
    that row's fair-share counter while it holds its groups' rows, the order opposite to a
    submit's, so a row lock could deadlock. SQLite's writers are serialized already."""
    return select(func.pg_advisory_xact_lock(func.hashtextextended(tenant_id, QUOTA_LOCK_SEED)))


def queued_jobs(tenant_id: str):
    """The tenant's queued jobs (from the summary)."""
    return select(func.coalesce(func.sum(G.c.queued_count), 0)).where(G.c.tenant_id == tenant_id)


QUEUED_BY_ADAPTER = (select(G.c.adapter_id, G.c.tenant_id, func.sum(G.c.queued_count).label("n"))
                     .where(G.c.queued_count > 0).group_by(G.c.adapter_id, G.c.tenant_id))
RUNNING_BY_ADAPTER = (select(J.c.adapter_name, J.c.tenant_id, func.count().label("n"))
                      .where(J.c.status == "running").group_by(J.c.adapter_name, J.c.tenant_id))

# ---- jobs: submit, read, cancel -----------------------------------------------------------------
INSERT_JOBS = J.insert()


def copy_jobs(columns: tuple[str, ...]) -> str:
    """PostgreSQL COPY (text format) into these columns of jobs, in this order."""
    return f"COPY jobs ({', '.join(columns)}) FROM STDIN"


def jobs_by_keys(tenant_id: str, keys):
    return select(J).where(J.c.tenant_id == tenant_id, J.c.idempotency_key.in_(keys))


def _of(table, tenant_id: str | None) -> list:
    return [table.c.tenant_id == tenant_id] if tenant_id else []


def job(job_id: str, tenant_id: str | None = None):
    return select(J).where(J.c.id == job_id, *_of(J, tenant_id))


def job_for_update(job_id: str, tenant_id: str | None):
    return job(job_id, tenant_id).with_for_update()


def job_position(job_id: str, tenant_id: str):
    """Where a job stands in its tenant's list: created_at, seq."""
    return select(J.c.created_at, J.c.seq).where(J.c.id == job_id, J.c.tenant_id == tenant_id)


def jobs_page(tenant_id: str, *, status: str | None, adapter: str | None,
              batch_id: str | None, after: tuple | None, limit: int):
    """The tenant's jobs, oldest first, after (created_at, seq, id) when given: jobs of one
    submit share created_at, so seq (the position in it) orders them."""
    cond = [J.c.tenant_id == tenant_id]
    if status is not None:
        cond.append(J.c.status == status)
    if adapter is not None:
        cond.append(J.c.adapter_name == adapter)
    if batch_id is not None:
        cond.append(J.c.batch_id == batch_id)
    if after is not None:
        cond.append(tuple_(J.c.created_at, J.c.seq, J.c.id) > tuple_(*after))
    return select(J).where(*cond).order_by(J.c.created_at, J.c.seq, J.c.id).limit(limit)


def cancel_queued_job(job_id: str, now):
    return update(J).where(J.c.id == job_id).values(status="cancelled", finished_at=now,
                                                    not_before=None)


def request_cancel(job_id: str):
    return update(J).where(J.c.id == job_id).values(cancel_requested=True)


# ---- claims: SQLite (and what both dialects share) -------------------------------------------
def _unclaim(*cond):
    """Running jobs back to the queue at their old place, the attempt not counted; those
    whose cancel was asked are left to ``_end_cancelled`` (run it first)."""
    return (update(J).where(*cond, J.c.status == "running", J.c.cancel_requested.is_(False))
            .values(status="queued", worker_id=None, lease_token=None, lease_expires_at=None,
                    attempts=J.c.attempts - 1)
            .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.enqueued_at))


def _end_cancelled(now, *cond):
    """Running jobs whose cancel was asked, given back unfinished: cancelled now (not queued
    again to run after all, as the reaper and ``fail`` end them too)."""
    return (update(J).where(*cond, J.c.status == "running", J.c.cancel_requested.is_(True))
            .values(status="cancelled", finished_at=now, lease_token=None,
                    lease_expires_at=None)
            .returning(J.c.id))


def release_claim(token: str):
    """Every job leased under token (a claim whose answer was lost)."""
    return _unclaim(J.c.lease_token == token)


def cancel_claim(token: str, now):
    """release_claim's jobs whose cancel was asked (run before it)."""
    return _end_cancelled(now, J.c.lease_token == token)


def terminate_backend(pid: int):
    """End a server process and wait for it to exit (PostgreSQL 14+: the timeout argument)."""
    return text("SELECT pg_terminate_backend(:pid, 5000)").bindparams(pid=pid)


def release_job(job_id: str, token: str):
    return _unclaim(J.c.id == job_id, J.c.lease_token == token)


def cancel_released_job(job_id: str, token: str, now):
    """release_job's job when its cancel was asked (run before it)."""
    return _end_cancelled(now, J.c.id == job_id, J.c.lease_token == token)


def live_workers(live_after):
    return select(W.c.id, W.c.hot, W.c.capacity).where(W.c.heartbeat_at > live_after)


def claim_group(group, n: int, now, worker_id: str, token: str, expires):
    """Lease up to n queued jobs of a (tenant, adapter, priority) group, oldest first."""
    pick = (select(J.c.id).where(
        J.c.status == "queued", J.c.tenant_id == group.tenant_id,
        J.c.adapter_id == group.adapter_id, J.c.priority == group.priority,
        J.c.enqueued_at <= now, or_(J.c.deadline.is_(None), J.c.deadline > now))
        .order_by(J.c.enqueued_at).limit(n).with_for_update(skip_locked=True)
        # Materialized: inlined as IN (subquery), PostgreSQL may run the SKIP LOCKED
        # subquery more than once and lease more than n rows.
        .cte("picked").prefix_with("MATERIALIZED", dialect="postgresql"))
    return (update(J).where(J.c.id == pick.c.id, J.c.status == "queued")
            .values(status="running", worker_id=worker_id, lease_token=token,
                    lease_expires_at=expires, attempts=J.c.attempts + 1, not_before=None,
                    started_at=func.coalesce(J.c.started_at, now))
            .returning(J.c.id, J.c.tenant_id, J.c.adapter_id, J.c.adapter_name, J.c.prompt,
                       J.c.messages, J.c.sampling, J.c.attempts))


def charge_group(key: tuple[str, int, int], n: int):
    """queue_groups -= n claimed jobs; its oldest job read again."""
    t, a, p = key
    oldest = (select(func.min(J.c.enqueued_at)).where(
        J.c.status == "queued", J.c.tenant_id == t, J.c.adapter_id == a,
        J.c.priority == p).scalar_subquery())
    return (update(G).where(G.c.tenant_id == t, G.c.adapter_id == a, G.c.priority == p)
            .values(queued_count=G.c.queued_count - n, oldest_enqueued_at=oldest))


def charge_tenant(tenant_id: str, floor: float, cost: float):
    """The tenant's fair-share counter: max(counter, floor) + cost."""
    return update(T).where(T.c.id == tenant_id).values(
        served=case((T.c.served < floor, floor), else_=T.c.served) + cost)


def snapshot_groups(dialect: str, *, overdue: int, by_priority: int, per_tenant: int):
    """Candidate groups for one claim, with their tenant's weight and fair-share counter:
    each tenant's next groups (by its own priority, then age), the globally oldest (aging),
    the highest priority classes,
    and every group of the worker's hot/warm adapters (bound parameter "affinity")."""
    live = G.c.queued_count > 0
    cols = [G.c.tenant_id, G.c.adapter_id, G.c.priority, G.c.queued_count,
            G.c.oldest_enqueued_at]
    parts = [select(*cols).where(live).order_by(G.c.oldest_enqueued_at).limit(overdue),
             select(*cols).where(live, G.c.priority > 0)
             .order_by(G.c.priority.desc(), G.c.oldest_enqueued_at).limit(by_priority),
             select(*cols).where(live, G.c.adapter_id.in_(bindparam("affinity", expanding=True)))]
    if dialect == "postgresql":
        # Per tenant, its next groups (its highest priority, then oldest): an index probe
        # per tenant (LATERAL).
        inner = (select(*cols).where(live, G.c.tenant_id == T.c.id)
                 .order_by(G.c.priority.desc(), G.c.oldest_enqueued_at).limit(per_tenant)
                 .lateral("g"))
        parts.append(select(*[inner.c[c.name] for c in cols])
                     .select_from(T.join(inner, literal_column("true"))))
    else:
        rn = func.row_number().over(partition_by=G.c.tenant_id,
                                    order_by=(G.c.priority.desc(),
                                              G.c.oldest_enqueued_at)).label("rn")
        ranked = select(*cols, rn).where(live).subquery()
        parts.append(select(*[ranked.c[c.name] for c in cols]).where(ranked.c.rn <= per_tenant))
    u = union(*[p.subquery().select() for p in parts]).subquery()
    return select(u, T.c.weight, T.c.served).join(T, T.c.id == u.c.tenant_id)


def touch_worker(dialect: str, worker_id: str, now, hot: list[int], warm: list[int],
                 capacity: int | None):
    """Record a worker's heartbeat and caches (and its engine rows, when capacity is given)."""
    ins = _insert(dialect)(W).values(id=worker_id, heartbeat_at=now, hot=hot, warm=warm,
                                     capacity=capacity or 0)
    cols = {"heartbeat_at": ins.excluded.heartbeat_at, "hot": ins.excluded.hot,
            "warm": ins.excluded.warm}
    if capacity is not None:
        cols["capacity"] = ins.excluded.capacity
    return ins.on_conflict_do_update(index_elements=["id"], set_=cols)


def fail_jobs(job_ids: list[str], now, error: str):
    return update(J).where(J.c.id.in_(job_ids)).values(status="failed", finished_at=now,
                                                       lease_token=None, error=error)


# ---- claims: PostgreSQL (run on the bare psycopg cursor, prepared) ----------------------------
# Data-modifying CTEs run once and to completion whether or not the final SELECT reads them.
# `picked` is materialized so the SKIP LOCKED subquery runs exactly once per group.
#
# `cfg` makes this statement's own (implicit) transaction commit asynchronously: the claim
# does not wait for its WAL flush. Safe: a claim lost in a server crash never happened, so
# its jobs are still queued and run again (at-least-once); the worker's complete() for them
# is fenced by a lease token that no longer exists and changes nothing. WAL is flushed in
# order, so a completion (synchronous commit) being durable implies its claim is durable.
CLAIM_JOBS_PG = _compact("""
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
  -- Each wanted tenant's next live group (highest priority, then oldest) not claimed from
  -- here (as of this statement's start), so the worker's cached snapshot keeps a group for
  -- every tenant with work.
  SELECT x.* FROM (SELECT DISTINCT tenant_id FROM want) s CROSS JOIN LATERAL (
    SELECT g.tenant_id, g.adapter_id, g.priority, g.queued_count, g.oldest_enqueued_at
    FROM queue_groups g
    WHERE g.tenant_id = s.tenant_id AND g.queued_count > 0 AND NOT EXISTS (
      SELECT 1 FROM per_group pg WHERE pg.tenant_id = g.tenant_id
        AND pg.adapter_id = g.adapter_id AND pg.priority = g.priority)
    ORDER BY g.priority DESC, g.oldest_enqueued_at LIMIT 1) x),
me AS (
  -- Only when the snapshot found the worker row stale (caches changed, heartbeat old).
  INSERT INTO workers (id, heartbeat_at, hot, warm, capacity)
  SELECT %(worker)s, %(now)s, CAST(%(hot)s AS json), CAST(%(warm)s AS json), 0 WHERE %(touch)s
  ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, hot = excluded.hot,
                                 warm = excluded.warm
  RETURNING 1)
-- With the adapter's row (NULL: base model, or deleted), so no second round trip reads it.
-- sampling as text: jobs of one submit usually share it, so the client decodes it once.
SELECT c.id, c.tenant_id, c.adapter_id, c.adapter_name, c.prompt, c.messages,
       c.sampling::text AS sampling, c.attempts, c.priority, c.enqueued_at, a.id AS a_id,
       a.name AS a_name, a.source AS a_source, a.revision AS a_revision,
       a.tenant_id AS a_tenant_id, a.rank AS a_rank, a.status AS a_status,
       a.base_model AS a_base_model, a.created_at AS a_created_at,
       -- Once (an InitPlan), repeated on every row: the claimed groups as this claim left
       -- them, the wanted tenants' next groups, and the served tenants' counters.
       (SELECT json_build_array(
          (SELECT json_agg(json_build_array(
                    z.tenant_id, z.adapter_id, z.priority, z.queued_count,
                    extract(epoch FROM z.oldest_enqueued_at)))
           FROM (SELECT * FROM groups UNION ALL SELECT * FROM nexts) z),
          (SELECT json_agg(json_build_array(id, served)) FROM served)))::text AS report
FROM claimed c LEFT JOIN adapters a ON a.id = c.adapter_id
""")

# A claim that leased nothing still records the worker's caches and heartbeat.
TOUCH_WORKER_PG = _compact("""
INSERT INTO workers (id, heartbeat_at, hot, warm, capacity)
VALUES (%(worker)s, %(now)s, CAST(%(hot)s AS json), CAST(%(warm)s AS json), 0)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, hot = excluded.hot,
                               warm = excluded.warm
""")

# Everything a claim reads, in one read-only autocommit round trip (no WAL flush): the
# worker's hot/warm ids that name existing adapters and its stored row (engine rows
# included), the hot lists of the other live workers, and the candidate groups with their
# tenant's weight and fair-share counter (one row per group; a single row with NULL group
# columns when nothing is queued).
CLAIM_SNAPSHOT_PG = _compact("""
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
  -- Each tenant's next group by its own order (its highest priority, then its oldest): one
  -- pass over the live groups (their number does not grow with the queued jobs), cheaper
  -- than an index probe per tenant.
  (SELECT DISTINCT ON (tenant_id) tenant_id, adapter_id, priority, queued_count,
          oldest_enqueued_at
   FROM queue_groups WHERE queued_count > 0
   ORDER BY tenant_id, priority DESC, oldest_enqueued_at)),
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
""")

# ---- leases: results, retries, releases, heartbeats ------------------------------------------
# Many results in one statement, each row still fenced by its own (id, lease token).
COMPLETE_MANY_PG = text("""
UPDATE jobs AS j SET status = v.status, finished_at = :now, lease_token = NULL,
  lease_expires_at = NULL, result_text = v.text, result_token_ids = CAST(v.token_ids AS json),
  finish_reason = v.finish_reason, prompt_tokens = v.prompt_tokens,
  completion_tokens = v.completion_tokens, cached_tokens = v.cached_tokens,
  timings = CAST(v.timings AS json), result_logprobs = CAST(v.logprobs AS json), error = NULL
FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[]), CAST(:statuses AS text[]),
            CAST(:texts AS text[]), CAST(:token_ids AS text[]), CAST(:finish AS text[]),
            CAST(:prompt_tokens AS int[]), CAST(:completion_tokens AS int[]),
            CAST(:cached_tokens AS int[]), CAST(:timings AS text[]), CAST(:logprobs AS text[]))
  AS v(id, token, status, text, token_ids, finish_reason, prompt_tokens, completion_tokens,
       cached_tokens, timings, logprobs)
WHERE j.id = v.id AND j.lease_token = v.token AND j.status = 'running'
RETURNING j.id
""")


def _fenced(job_id: str, token: str):
    return update(J).where(J.c.id == job_id, J.c.lease_token == token)


def complete_job(job_id: str, token: str, result, *, status: str, now):
    """Record a result, fenced by the lease token (no row: the lease is not held)."""
    return _fenced(job_id, token).where(J.c.status == "running").values(
        status=status, finished_at=now, lease_token=None, lease_expires_at=None,
        result_text=result.text, result_token_ids=list(result.token_ids),
        finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens, cached_tokens=result.cached_tokens,
        timings=dict(result.timings or {}),
        result_logprobs=None if result.logprobs is None else list(result.logprobs),
        error=None)


def running_job_for_update(job_id: str, token: str):
    return (select(J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.attempts,
                   J.c.max_attempts, J.c.cancel_requested)
            .where(J.c.id == job_id, J.c.lease_token == token, J.c.status == "running")
            .with_for_update())


def retry_job(job_id: str, token: str, when, error: str):
    """Back to the queue, not before when (its backoff)."""
    return _fenced(job_id, token).values(status="queued", worker_id=None, lease_token=None,
                                         lease_expires_at=None, not_before=when,
                                         enqueued_at=when, error=error)


def end_job(job_id: str, token: str, status: str, now, error: str):
    return _fenced(job_id, token).values(status=status, finished_at=now, lease_token=None,
                                         lease_expires_at=None, error=error)


def cancels_asked(job_ids: list[str]):
    """Which of these running jobs have a cancel waiting (a read: the cancel poll)."""
    return select(J.c.id).where(J.c.id.in_(job_ids), J.c.status == "running",
                                J.c.cancel_requested.is_(True))


def extend_leases(pairs: list[tuple[str, str]], expires):
    """Running jobs of these (id, lease token) pairs: lease until expires."""
    return (update(J).where(tuple_(J.c.id, J.c.lease_token).in_(pairs), J.c.status == "running")
            .values(lease_expires_at=expires).returning(J.c.id, J.c.cancel_requested))


# ---- maintenance ---------------------------------------------------------------------------------
def _pick(limit: int, *cond):
    return (select(J.c.id).where(*cond).limit(limit).with_for_update(skip_locked=True)
            .cte("picked").prefix_with("MATERIALIZED", dialect="postgresql"))


def reap_expired(now, limit: int):
    """Up to limit running jobs whose lease ran out lose it (what becomes of them is decided
    from the returned rows)."""
    pick = _pick(limit, J.c.status == "running", J.c.lease_expires_at < now)
    return (update(J).where(J.c.id == pick.c.id, J.c.status == "running")
            .values(lease_token=None, lease_expires_at=None, worker_id=None)
            .returning(J.c.id, J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.attempts,
                       J.c.max_attempts, J.c.cancel_requested, J.c.enqueued_at))


def requeue_reaped(job_ids: list[str]):
    return update(J).where(J.c.id.in_(job_ids)).values(status="queued",
                                                       error="lease expired (worker lost)")


def end_reaped(job_id: str, status: str, now, error: str | None):
    return update(J).where(J.c.id == job_id).values(status=status, finished_at=now, error=error)


def expire_deadlines(now, limit: int):
    """Up to limit queued or running jobs past their deadline become expired."""
    open_ = ("queued", "running")
    pick = _pick(limit, J.c.deadline < now, J.c.status.in_(open_))
    return (update(J).where(J.c.id == pick.c.id, J.c.status.in_(open_))
            .values(status="expired", finished_at=now, lease_token=None, lease_expires_at=None,
                    error="deadline passed before the job finished")
            .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.enqueued_at,
                       J.c.started_at, J.c.worker_id))


def prune_workers(cutoff):
    return delete(W).where(W.c.heartbeat_at < cutoff)


def last_run(name: str):
    return select(M.c.last_run_at).where(M.c.name == name)


def record_run(dialect: str, name: str, now):
    """maintenance_runs[name] = now, unless a later run is recorded (clocks of several hosts)."""
    ins = _insert(dialect)(M).values(name=name, last_run_at=now)
    return ins.on_conflict_do_update(
        index_elements=["name"], set_={"last_run_at": ins.excluded.last_run_at},
        where=M.c.last_run_at < ins.excluded.last_run_at)


def take_turn(dialect: str, name: str, now, before):
    """maintenance_runs[name] = now if no run is recorded at or after ``before``: one
    process of many takes the turn (the row comes back), the others get no row."""
    ins = _insert(dialect)(M).values(name=name, last_run_at=now)
    return ins.on_conflict_do_update(
        index_elements=["name"], set_={"last_run_at": ins.excluded.last_run_at},
        where=M.c.last_run_at < before).returning(M.c.name)


# ---- batches -------------------------------------------------------------------------------------
INSERT_BATCH = B.insert()
INSERT_REJECTS = R.insert()


def update_batch(batch_id: str, **values):
    return update(B).where(B.c.id == batch_id).values(**values)


def batch(batch_id: str, tenant_id: str | None = None):
    return select(B).where(B.c.id == batch_id, *_of(B, tenant_id))


def batch_for_update(batch_id: str, tenant_id: str | None = None):
    return select(B.c.id).where(B.c.id == batch_id, *_of(B, tenant_id)).with_for_update()


def batch_id_by_key(tenant_id: str, key: str):
    return select(B.c.id).where(B.c.tenant_id == tenant_id, B.c.idempotency_key == key)


def batch_job_counts(batch_id: str):
    """(status, n) of the batch's jobs."""
    return (select(J.c.status, func.count().label("n")).where(J.c.batch_id == batch_id)
            .group_by(J.c.status))


def cancel_queued_batch_jobs(batch_id: str, now):
    return (update(J).where(J.c.batch_id == batch_id, J.c.status == "queued")
            .values(status="cancelled", finished_at=now)
            .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.enqueued_at))


def request_cancel_batch_jobs(batch_id: str):
    return (update(J).where(J.c.batch_id == batch_id, J.c.status == "running")
            .values(cancel_requested=True))


def finished_batches(open_statuses):
    """Ids of open batches none of whose jobs is queued or running."""
    pending = exists().where(J.c.batch_id == B.c.id, J.c.status.in_(("queued", "running")))
    return select(B.c.id).where(B.c.status.in_(open_statuses), ~pending)


def lock_batch(dialect: str, batch_id: str, open_statuses):
    """The batch while open, locked (PostgreSQL: skipped when another maintain holds it)."""
    stmt = select(B).where(B.c.id == batch_id, B.c.status.in_(open_statuses))
    if dialect == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return stmt


def batch_rejects(batch_id: str, after_line: int, limit: int):
    return (select(R).where(R.c.batch_id == batch_id, R.c.line > after_line)
            .order_by(R.c.line).limit(limit))


def batch_jobs(batch_id: str, after_seq: int, *, statuses=None, tenant_id: str | None = None,
               limit: int = 1000):
    """The batch's jobs in input order after position after_seq."""
    cond = [J.c.batch_id == batch_id, J.c.seq > after_seq]
    if statuses is not None:
        cond.append(J.c.status.in_(statuses))
    return select(J).where(*cond, *_of(J, tenant_id)).order_by(J.c.seq).limit(limit)


def batch_created(batch_id: str, tenant_id: str):
    return select(B.c.created_at).where(B.c.id == batch_id, B.c.tenant_id == tenant_id)


def batch_ids_page(tenant_id: str, after: tuple | None, limit: int):
    """The tenant's batch ids, newest first, after (created_at, id) when given."""
    cond = [B.c.tenant_id == tenant_id]
    if after is not None:
        cond.append(tuple_(B.c.created_at, B.c.id) < tuple_(*after))
    return (select(B.c.id).where(*cond).order_by(B.c.created_at.desc(), B.c.id.desc())
            .limit(limit))


# ---- files ---------------------------------------------------------------------------------------
INSERT_FILE = F.insert()
INSERT_CHUNK = C.insert()


def set_file_size(file_id: str, size: int, lines: int):
    return update(F).where(F.c.id == file_id).values(bytes=size, lines=lines)


def file(file_id: str, tenant_id: str | None = None):
    return select(F).where(F.c.id == file_id, *_of(F, tenant_id))


def file_exists(file_id: str, tenant_id: str | None = None):
    return select(F.c.id).where(F.c.id == file_id, *_of(F, tenant_id))


def file_by_key(tenant_id: str, key: str):
    return select(F).where(F.c.tenant_id == tenant_id, F.c.idempotency_key == key)


def file_created(file_id: str, tenant_id: str):
    return select(F.c.created_at).where(F.c.id == file_id, F.c.tenant_id == tenant_id)


def files_page(tenant_id: str, *, purpose: str | None, after: tuple | None, order: str,
               limit: int):
    """The tenant's files by creation time ("desc": newest first), after (created_at, id)."""
    cond = [F.c.tenant_id == tenant_id]
    if purpose is not None:
        cond.append(F.c.purpose == purpose)
    if after is not None:
        key, mark = tuple_(F.c.created_at, F.c.id), tuple_(*after)
        cond.append(key < mark if order == "desc" else key > mark)
    sort = (F.c.created_at.desc(), F.c.id.desc()) if order == "desc" \
        else (F.c.created_at, F.c.id)
    return select(F).where(*cond).order_by(*sort).limit(limit)


def file_chunk(file_id: str, seq: int):
    return select(C.c.data).where(C.c.file_id == file_id, C.c.seq == seq)


def storage_lock(tenant_id: str):
    """PostgreSQL: the lock that makes a tenant's stored-bytes check and its new file one step
    (uploads of the tenant wait on one another only at their commit)."""
    return select(func.pg_advisory_xact_lock(func.hashtextextended(tenant_id,
                                                                   STORAGE_LOCK_SEED)))


def adapters_lock(tenant_id: str):
    """PostgreSQL: the lock that makes a tenant's adapter count and its new adapter one step."""
    return select(func.pg_advisory_xact_lock(func.hashtextextended(tenant_id,
                                                                   ADAPTERS_LOCK_SEED)))


def own_adapters(tenant_id: str):
    return select(func.count()).select_from(A).where(A.c.tenant_key == tenant_id)


def stored_bytes(tenant_id: str, but: str):
    """The bytes of the tenant's files other than ``but`` (uploads, outputs, error files)."""
    return select(func.coalesce(func.sum(F.c.bytes), 0)).where(F.c.tenant_id == tenant_id,
                                                                 F.c.id != but)


def expired_files(now, limit: int):
    return select(F.c.id).where(F.c.expires_at.is_not(None), F.c.expires_at <= now).limit(limit)


def delete_file(file_id: str):
    return delete(F).where(F.c.id == file_id)


def delete_file_chunks(file_id: str):
    return delete(C).where(C.c.file_id == file_id)
