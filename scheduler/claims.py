"""Claiming micro-batches: read a small snapshot, let scheduler.policy choose, lease the jobs
(PostgreSQL: one SKIP LOCKED statement, see claim_pg, with the snapshot cached between claims,
see claim_cache; SQLite: one serialized transaction)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, case, event, func, literal_column, or_, select, union, update
from sqlalchemy.exc import DBAPIError, OperationalError

from lorry.scheduler.claim_cache import bump_generation, wanted_groups
from lorry.scheduler.claim_pg import HEARTBEAT_REFRESH_S, claim_rows, read_snapshot, touch_worker
from lorry.scheduler.db import add_to_groups, epoch_seconds, insert_for, make_engine
from lorry.scheduler.models import Adapter, Job, QueueGroup, Tenant, Worker
from lorry.scheduler.policy import Group, Snapshot, plan_claim
from lorry.scheduler.rows import adapter_info
from lorry.scheduler.types import AdapterInfo, ClaimedJob, MicroBatch

J, G, A, T, W = (Job.__table__, QueueGroup.__table__, Adapter.__table__, Tenant.__table__,
                 Worker.__table__)
log = logging.getLogger(__name__)
ADAPTER_CACHE_S = 2.0
PER_TENANT = 1    # oldest group per tenant in the snapshot (fair-share candidates)
OVERDUE = 16      # globally oldest groups (aging candidates)
PRIORITY = 32     # highest-priority groups above the default class
SPARE = 1         # PostgreSQL: spare jobs planned per free slot (used when takes come short)
RESCUE_EVERY_S = 5.0  # claims requeue expired leases at most this often (queue clock)

try:  # PostgreSQL's driver; the SQLite path runs without it
    import psycopg
    _PG_ERRORS: tuple = (psycopg.OperationalError,)
except ImportError:  # pragma: no cover
    _PG_ERRORS = ()


class ClaimOps:
    def claim(self, worker_id: str, hot: list, warm: list, free_slots: int,
              lease_seconds: float = 60, max_adapters: int | None = None) -> list[MicroBatch]:
        """Lease up to free_slots jobs as micro-batches, one per adapter.

        hot/warm are the AdapterInfo ids (the engine's lora_int_id) of the adapters in the
        worker's GPU slots / CPU cache; names are refused (TypeError). The call also records
        them (and a heartbeat) for the worker, and every RESCUE_EVERY_S it first requeues
        expired leases (see MaintenanceOps.reap_expired_leases), so that a dead worker's jobs
        come back even while beat is down.
        """
        hot, warm = adapter_ids(hot, "hot"), adapter_ids(warm, "warm")
        if not isinstance(free_slots, int) or free_slots < 0:
            raise ValueError(f"free_slots must be an int >= 0, got {free_slots!r}")
        if free_slots == 0:
            return []
        self._rescue_stalled()
        pg = self.engine.dialect.name == "postgresql"
        for attempt in range(3):
            try:
                if pg:
                    return self._claim_pg(worker_id, hot, warm, free_slots, lease_seconds,
                                          max_adapters)
                return self._claim_once(worker_id, hot, warm, free_slots, lease_seconds,
                                        max_adapters)
            except Exception as exc:
                # Two claims updating the same summary rows in opposite orders: PostgreSQL
                # aborts one of them; a connection lost before the claim's reply. Nothing was
                # leased (or the lease runs out unused), so trying again is safe.
                orig = getattr(exc, "orig", exc)
                retry = ("deadlock" in str(orig).lower()
                         or getattr(exc, "connection_invalidated", False)
                         or getattr(exc, "lorry_reconnect", False))
                if attempt == 2 or not retry or not isinstance(exc, (OperationalError,
                                                                      DBAPIError) + _PG_ERRORS):
                    raise
                token = getattr(exc, "lorry_lease_token", None)
                if token is not None:  # the lost reply may have leased jobs: give them back
                    self._release_lost_claim(token)
        return []

    def _rescue_stalled(self) -> None:
        """Requeue expired leases if this queue's claims have not done so for RESCUE_EVERY_S
        (by the queue's clock): beat's maintain is then not the only reaper."""
        now = self.now()
        last = self.__dict__.get("_rescued_at")
        if last is not None and timedelta(0) <= now - last < timedelta(seconds=RESCUE_EVERY_S):
            return
        self._rescued_at = now
        try:
            self.reap_expired_leases()
        except Exception as e:  # noqa: BLE001  the database is away: the claim says so itself
            log.warning("could not requeue expired leases before a claim: %s", e)

    def _release_lost_claim(self, token: str) -> None:
        """Requeue the jobs a claim leased under ``token`` whose reply never arrived (the
        connection died after the server committed): nobody holds them, and waiting for the
        lease to run out would cost them an attempt (``failed`` at max_attempts=1)."""
        try:
            with self.engine.begin() as conn:
                rows = conn.execute(update(J).where(
                    J.c.lease_token == token, J.c.status == "running")
                    .values(status="queued", worker_id=None, lease_token=None,
                            lease_expires_at=None, attempts=J.c.attempts - 1)
                    .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority,
                               J.c.enqueued_at)).all()
                deltas: dict = {}
                for r in rows:
                    key = (r.tenant_id, r.adapter_id, r.priority)
                    n, oldest = deltas.get(key, (0, r.enqueued_at))
                    deltas[key] = (n + 1, min(oldest, r.enqueued_at))
                add_to_groups(conn, deltas)
        except Exception as e:  # noqa: BLE001  the server is still away: the reaper will
            log.warning("could not requeue the jobs of a lost claim (%s): %s", token, e)

    def _claim_pg(self, worker_id, hot, warm, free_slots, lease_seconds, max_adapters):
        """One claim statement, after a snapshot read only when the cached one is not usable
        (see scheduler.claim_cache). A claim planned from a cached snapshot that leases
        nothing (other claimers emptied its groups, or a group went live that the snapshot
        cannot show: see ClaimSnapshot.unseen_filter) is made again from a fresh one."""
        now, mono, ttl = self.now(), time.monotonic(), self.snapshot_ttl_seconds
        snaps = self.__dict__.setdefault("_claim_snapshots", {})
        snap = snaps.pop(worker_id, None)  # a thread claiming as the same worker reads anew
        if snap is not None and not (ttl > 0 and snap.usable(now, mono, ttl)
                                     and snap.resolve(hot, warm) is not None):
            snap = None
        call = _PgClaim(worker_id, hot, warm, free_slots, max_adapters, now, mono,
                        now + timedelta(seconds=lease_seconds))
        with self._claim_engine().connect() as conn:
            raw = conn.connection.driver_connection
            try:
                cur = raw.cursor()
                snap, wants, rows = self._lease_pg(cur, snap, call)
                if wants and not rows and not call.fresh:
                    snap, wants, rows = self._lease_pg(cur, None, call)
            except _PG_ERRORS as exc:
                if raw.broken or raw.closed:  # the server went away (restart, failover)
                    conn.invalidate()
                    self._claim_pool.dispose()  # its other idle connections are dead too
                    exc.lorry_reconnect = True  # claim() tries again on a new connection
                    exc.lorry_lease_token = call.token  # ... after requeueing what it leased
                raise
            if not wants:
                snaps[worker_id] = snap
                return []
            claimed, got, infos = _claimed_pg(rows, call.token, wants)
            report = json.loads(rows[0][19]) if rows else [None, None]
            if ttl > 0 and snap.apply(wants, free_slots, got, report[0] or [],
                                      report[1] or []):
                snaps[worker_id] = snap
            return self._micro_batches(conn, claimed, now, infos)

    def _lease_pg(self, cur, snap, call: _PgClaim) -> tuple:
        """Plan from snap (None: read a fresh one; a cached one's short plan is made again
        from a fresh one) and lease the plan in one statement. Returns (the snapshot, the
        wanted (group, count) pairs, the claimed rows); no pairs when nothing is planned."""
        now, epoch = call.now, epoch_seconds(call.now)
        call.fresh = snap is None
        if call.fresh:
            snap = self._read_snapshot(cur, call.worker_id, call.hot, call.warm, now, call.mono)
        ids = (snap.hot, snap.warm) if call.fresh else snap.resolve(call.hot, call.warm)
        plan = self._plan(snap, ids, epoch, call.free_slots, call.max_adapters, call.worker_id)
        if not call.fresh and sum(t.count for t in plan.takes) < call.free_slots:
            call.fresh = True
            snap = self._read_snapshot(cur, call.worker_id, call.hot, call.warm, now, call.mono)
            ids = (snap.hot, snap.warm)
            plan = self._plan(snap, ids, epoch, call.free_slots, call.max_adapters,
                              call.worker_id)
        hot_ids, warm_ids = ids
        touch = snap.worker_stale(hot_ids, warm_ids, now, HEARTBEAT_REFRESH_S)
        if touch:
            snap.written = (hot_ids, warm_ids, now)
        if not plan.takes:
            if touch:
                touch_worker(cur, call.worker_id, now, hot_ids, warm_ids)
            return snap, [], []
        call.token = uuid.uuid4().hex
        wants = wanted_groups(plan)
        rows = claim_rows(cur, wants, call.free_slots, now=now, worker_id=call.worker_id,
                          token=call.token, expires=call.expires, floor=plan.floor,
                          touch=touch, hot=hot_ids, warm=warm_ids, unseen=snap.unseen_filter())
        return snap, wants, rows

    def _read_snapshot(self, cur, worker_id, hot, warm, now, mono):
        return read_snapshot(cur, worker_id, hot, warm, now=now, mono=mono,
                             live_after=now - timedelta(seconds=self.worker_ttl_seconds),
                             overdue=OVERDUE, by_priority=PRIORITY)

    def _plan(self, snap, ids, epoch, free_slots, max_adapters, worker_id):
        hot = set(ids[0])
        return plan_claim(Snapshot(
            groups=list(snap.groups.values()), now=epoch, free_slots=free_slots, hot=hot,
            warm=set(ids[1]), hot_elsewhere=snap.others - hot, weights=snap.weights,
            served=snap.served, aging_seconds=self.aging_seconds, max_adapters=max_adapters,
            salt=worker_id, workers=snap.workers, capacity=snap.capacity),
            spare=SPARE * free_slots)

    def _claim_engine(self):
        """Claims' own pool: autocommit, and no ping per checkout (a round trip per claim);
        a connection found dead is invalidated and the claim retried."""
        engine = self.__dict__.get("_claim_pool")
        if engine is None:
            kwargs = dict(getattr(self, "_engine_kwargs", {}), pool_pre_ping=False,
                          isolation_level="AUTOCOMMIT")
            engine = self._claim_pool = make_engine(self.url, **kwargs)

            @event.listens_for(engine, "connect")
            def _generic_plans(dbapi_conn, _record):
                # The claim and snapshot statements are prepared; their custom plans took
                # longer to make (~1 ms) than to run. Their plans do not depend on the
                # parameters' values (index probes per group), so one generic plan serves.
                with dbapi_conn.cursor() as cur:
                    cur.execute("SET plan_cache_mode = force_generic_plan")
        return engine

    def _claim_once(self, worker_id, hot, warm, free_slots, lease_seconds, max_adapters):
        """SQLite: one serialized (BEGIN IMMEDIATE) transaction."""
        now = self.now()
        epoch = epoch_seconds(now)
        live_after = now - timedelta(seconds=self.worker_ttl_seconds)
        with self.engine.begin() as conn:
            hot_ids, warm_ids = self._adapter_ids(conn, hot), self._adapter_ids(conn, warm)
            self._touch_worker(conn, worker_id, hot_ids, warm_ids, None, now)
            groups, tenants = self._snapshot_groups(conn, hot_ids | warm_ids, now)
            if not groups:
                return []
            elsewhere, workers, capacity = set(), 0, 0
            for wid, others, rows in conn.execute(select(W.c.id, W.c.hot, W.c.capacity).where(
                    W.c.heartbeat_at > live_after)):  # this worker's row included (touched)
                workers += 1
                if wid == worker_id:
                    capacity = rows or 0
                else:
                    elsewhere |= {x for x in others or [] if isinstance(x, int)}
            plan = plan_claim(Snapshot(
                groups=groups, now=epoch, free_slots=free_slots, hot=hot_ids, warm=warm_ids,
                hot_elsewhere=elsewhere - hot_ids,
                weights={t: r.weight for t, r in tenants.items()},
                served={t: r.served for t, r in tenants.items()},
                aging_seconds=self.aging_seconds, max_adapters=max_adapters, salt=worker_id,
                workers=max(workers, 1), capacity=capacity))
            if not plan.takes:
                return []
            token = uuid.uuid4().hex
            expires = now + timedelta(seconds=lease_seconds)
            rows = self._claim_serialized(conn, plan, now, worker_id, token, expires, tenants)
            claimed: dict[int, list[ClaimedJob]] = {}
            for r in rows:
                claimed.setdefault(r.adapter_id, []).append(ClaimedJob(
                    id=r.id, lease_token=token, tenant_id=r.tenant_id, adapter=r.adapter_name,
                    prompt=r.prompt, messages=r.messages, sampling=dict(r.sampling or {}),
                    attempts=r.attempts))
            return self._micro_batches(conn, claimed, now)

    def _claim_serialized(self, conn, plan, now, worker_id, token, expires, tenants) -> list:
        """SQLite: the transaction holds the write lock, so one UPDATE per group is safe."""
        rows, taken = [], {}
        for take in plan.takes:
            got = conn.execute(self._claim_stmt(take.group, take.count, now, worker_id, token,
                                                expires)).all()
            if got:
                taken[take.group.key] = taken.get(take.group.key, 0) + len(got)
                rows.extend(got)
        self._charge(conn, taken, tenants, plan.floor)
        return rows

    def _claim_stmt(self, g: Group, n: int, now, worker_id, token, expires):
        pick = (select(J.c.id).where(
            J.c.status == "queued", J.c.tenant_id == g.tenant_id,
            J.c.adapter_id == g.adapter_id, J.c.priority == g.priority,
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

    def _charge(self, conn, taken: dict, tenants: dict, floor: float) -> None:
        """queue_groups -= claimed and tenants' fair-share counters += claimed/weight, in the
        sorted lock order (groups, then tenants) that every writer follows."""
        for (t, a, p), n in sorted(taken.items()):
            oldest = (select(func.min(J.c.enqueued_at)).where(
                J.c.status == "queued", J.c.tenant_id == t, J.c.adapter_id == a,
                J.c.priority == p).scalar_subquery())
            conn.execute(update(G).where(G.c.tenant_id == t, G.c.adapter_id == a,
                                         G.c.priority == p)
                         .values(queued_count=G.c.queued_count - n, oldest_enqueued_at=oldest))
        per_tenant: dict[str, int] = {}
        for (t, _, _), n in taken.items():
            per_tenant[t] = per_tenant.get(t, 0) + n
        for t, n in sorted(per_tenant.items()):
            cost = n / max(tenants[t].weight, 1e-9)
            conn.execute(update(T).where(T.c.id == t).values(
                served=case((T.c.served < floor, floor), else_=T.c.served) + cost))

    def _snapshot_groups(self, conn, affinity_ids: set[int], now) -> tuple[list[Group], dict]:
        stmt = getattr(self, "_snapshot_stmt", None)
        if stmt is None:
            stmt = self._snapshot_stmt = snapshot_statement(conn.dialect.name)
        rows = conn.execute(stmt, {"affinity": sorted(affinity_ids)}).all()
        return self._groups_of(rows, now)

    def _groups_of(self, rows, now) -> tuple[list[Group], dict]:
        far = epoch_seconds(now) + 1e9
        tenants = {r.tenant_id: r for r in rows}
        # Columns by position: tenant, adapter, priority, queued, oldest (hot path).
        return [Group(r[0], r[1], r[2], r[3], epoch_seconds(r[4]) if r[4] is not None else far)
                for r in rows], tenants

    def _adapter_ids(self, conn, refs) -> set[int]:
        return set(adapter_ids(refs, "hot/warm"))

    def _touch_worker(self, conn, worker_id, hot_ids, warm_ids, capacity, now) -> None:
        # Adapters are stored as ids, so other claims compare them without a name lookup.
        ins = insert_for(conn.engine)(W).values(
            id=worker_id, heartbeat_at=now, hot=sorted(hot_ids), warm=sorted(warm_ids),
            capacity=capacity or 0)
        update_cols = dict(heartbeat_at=ins.excluded.heartbeat_at, hot=ins.excluded.hot,
                           warm=ins.excluded.warm)
        if capacity is not None:
            update_cols["capacity"] = ins.excluded.capacity
        conn.execute(ins.on_conflict_do_update(index_elements=["id"], set_=update_cols))
        bump_generation()  # "hot on another live worker" changed for this process's snapshots

    def _micro_batches(self, conn, claimed: dict, now, infos: dict | None = None
                       ) -> list[MicroBatch]:
        """One MicroBatch per adapter; jobs of a deleted adapter fail. infos: the claimed
        adapters' rows when the claim statement read them (PostgreSQL), else looked up."""
        if infos is None:
            # Adapter rows change rarely: a short-lived per-process cache saves a round trip
            # per claim (a just-deleted adapter may still be handed out for ADAPTER_CACHE_S).
            cache = self.__dict__.setdefault("_adapter_cache", {})
            clock = time.monotonic()
            infos = {a: cache[a][0] for a in claimed if a in cache and cache[a][1] > clock}
            missing = [a for a in claimed if a != 0 and a not in infos]
            if missing:
                for r in conn.execute(select(A).where(A.c.id.in_(missing))):
                    infos[r.id] = adapter_info(r)
                    cache[r.id] = (infos[r.id], clock + ADAPTER_CACHE_S)
        out = []
        for adapter_id, jobs in claimed.items():
            if adapter_id != 0 and adapter_id not in infos:
                conn.execute(update(J).where(J.c.id.in_([j.id for j in jobs])).values(
                    status="failed", finished_at=now, lease_token=None,
                    error=f"adapter {jobs[0].adapter!r} (id {adapter_id}) was deleted"))
                continue
            out.append(MicroBatch(adapter=infos.get(adapter_id), jobs=jobs))
        return out


@dataclass
class _PgClaim:
    """One claim() call on PostgreSQL: its arguments, and the last statement's lease token
    and whether it was planned from a fresh snapshot."""

    worker_id: str
    hot: list
    warm: list
    free_slots: int
    max_adapters: int | None
    now: datetime
    mono: float
    expires: datetime
    token: str | None = None
    fresh: bool = False


def _claimed_pg(rows: list, token: str, wants: list) -> tuple[dict, dict, dict]:
    """From the claim statement's rows (columns: see claim_pg.claim_rows): the claimed jobs
    by adapter id in the plan's order (wants), oldest first within a group; the jobs claimed
    per group key; and the claimed adapters' rows by id."""
    claimed: dict[int, list[ClaimedJob]] = {}
    got: dict[tuple, int] = {}
    infos: dict[int, AdapterInfo] = {}
    decoded: dict[str, dict] = {}
    place = {g.key: i for i, (g, _) in enumerate(wants)}
    for r in sorted(rows, key=lambda r: (place.get((r[1], r[2], r[8]), len(place)), r[9])):
        sampling = decoded.get(r[6])
        if sampling is None:
            sampling = decoded[r[6]] = json.loads(r[6]) if r[6] is not None else {}
        claimed.setdefault(r[2], []).append(ClaimedJob(
            r[0], token, r[1], r[3], r[4], r[5], dict(sampling), r[7]))
        key = (r[1], r[2], r[8])
        got[key] = got.get(key, 0) + 1
        if r[10] is not None and r[10] not in infos:
            infos[r[10]] = AdapterInfo(*r[10:19])
    return claimed, got, infos


def adapter_ids(refs, side: str) -> list[int]:
    """A worker's hot or warm adapters as AdapterInfo ids. Names are refused: tenants name
    their own adapters, so a name does not say which adapter a worker has loaded."""
    out = []
    for ref in refs or ():
        if isinstance(ref, bool) or not isinstance(ref, int):
            raise TypeError(f"{side} adapters are AdapterInfo.id ints (the engine's "
                            f"lora_int_id), not names; got {ref!r}")
        out.append(ref)
    return out


def snapshot_statement(dialect: str):
    """Candidate groups for one claim, with their tenant's weight and fair-share counter:
    each tenant's oldest groups, the globally oldest (aging), the highest priority classes,
    and every group of the worker's hot/warm adapters (bound parameter "affinity")."""
    live = G.c.queued_count > 0
    cols = [G.c.tenant_id, G.c.adapter_id, G.c.priority, G.c.queued_count,
            G.c.oldest_enqueued_at]
    parts = [select(*cols).where(live).order_by(G.c.oldest_enqueued_at).limit(OVERDUE),
             select(*cols).where(live, G.c.priority > 0)
             .order_by(G.c.priority.desc(), G.c.oldest_enqueued_at).limit(PRIORITY),
             select(*cols).where(live, G.c.adapter_id.in_(bindparam("affinity", expanding=True)))]
    if dialect == "postgresql":
        # Per tenant, its oldest groups: an index probe per tenant (LATERAL).
        inner = (select(*cols).where(live, G.c.tenant_id == T.c.id)
                 .order_by(G.c.oldest_enqueued_at).limit(PER_TENANT).lateral("g"))
        parts.append(select(*[inner.c[c.name] for c in cols])
                     .select_from(T.join(inner, literal_column("true"))))
    else:
        rn = func.row_number().over(partition_by=G.c.tenant_id,
                                    order_by=G.c.oldest_enqueued_at).label("rn")
        ranked = select(*cols, rn).where(live).subquery()
        parts.append(select(*[ranked.c[c.name] for c in cols]).where(ranked.c.rn <= PER_TENANT))
    u = union(*[p.subquery().select() for p in parts]).subquery()
    return select(u, T.c.weight, T.c.served).join(T, T.c.id == u.c.tenant_id)
