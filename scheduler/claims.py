"""Claiming micro-batches: read a small snapshot, let scheduler.policy choose, lease the jobs
(PostgreSQL: one SKIP LOCKED statement, see claim_pg, with the snapshot cached between claims,
see claim_cache; SQLite: one serialized transaction)."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from lorry.scheduler import errors
from lorry.scheduler import queries as q
from lorry.scheduler.claim_cache import bump_generation, wanted_groups
from lorry.scheduler.claim_pg import (
    HEARTBEAT_REFRESH_S,
    NO_ROWS,
    claim_rows,
    decode_claim,
    read_snapshot,
    touch_worker,
)
from lorry.scheduler.db import add_to_groups, epoch_seconds
from lorry.scheduler.policy import Group, Snapshot, plan_claim
from lorry.scheduler.rows import adapter_info
from lorry.scheduler.types import ClaimedJob, MicroBatch

log = logging.getLogger(__name__)
ADAPTER_CACHE_S = 2.0
PER_TENANT = 1    # next group per tenant (its highest priority, then oldest): fair-share candidates
OVERDUE = 16      # globally oldest groups (aging candidates)
PRIORITY = 32     # highest-priority groups above the default class
SPARE = 1         # PostgreSQL: spare jobs planned per free slot (used when takes come short)
RESCUE_EVERY_S = 5.0  # claims requeue expired leases at most this often (queue clock)
CLAIM_ATTEMPTS = 3  # a claim aborted by a conflict or a lost connection is made again
DELETED_ROUNDS = 1000  # claims in one call while each leases only deleted adapters' jobs


class ClaimOps:
    def claim(self, worker_id: str, hot: list, warm: list, free_slots: int,
              lease_seconds: float = 60, max_adapters: int | None = None) -> list[MicroBatch]:
        """Lease up to free_slots jobs as micro-batches, one per adapter.

        hot/warm are the AdapterInfo ids (the engine's lora_int_id) of the adapters in the
        worker's GPU slots / CPU cache; names are refused (TypeError). The call also records
        them (and a heartbeat) for the worker, and every RESCUE_EVERY_S it first requeues
        expired leases (see MaintenanceOps.reap_expired_leases), so that a dead worker's jobs
        come back even while beat is down. A claim that the database aborted (errors.Retryable)
        or whose connection broke (errors.ConnectionLost) is made again, up to CLAIM_ATTEMPTS.
        """
        hot, warm = adapter_ids(hot, "hot"), adapter_ids(warm, "warm")
        if not isinstance(free_slots, int) or free_slots < 0:
            raise ValueError(f"free_slots must be an int >= 0, got {free_slots!r}")
        if free_slots == 0:
            return []
        self._rescue_stalled()
        for _ in range(DELETED_ROUNDS):
            got = self._claim_retried(worker_id, hot, warm, free_slots, lease_seconds,
                                      max_adapters)
            # every job it leased was of a deleted adapter (failed in _micro_batches): that
            # says nothing of the queue, so claim again; an empty answer here meant "queue
            # empty" to the drain, which ended, leaving the rest for the next nudge (~14
            # such jobs failed a second against thousands queued: a bulk audit)
            if got or not getattr(got, "failed", 0):
                return got
        return got

    def _claim_retried(self, *args) -> list[MicroBatch]:
        once = self._claim_pg if self.connector.dialect == "postgresql" else self._claim_once
        for _ in range(CLAIM_ATTEMPTS - 1):
            try:
                return once(*args)
            except (errors.Retryable, errors.ConnectionLost):
                # Two claims updating the same summary rows in opposite orders: PostgreSQL
                # aborts one of them; a connection lost before the claim's reply. Whatever the
                # failed attempt leased was given back (_claim_pg), so trying again is safe.
                continue
        return once(*args)

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
            with self.connector.begin() as conn:
                deltas: dict = {}
                conn.execute(q.cancel_claim(token, self.now()))
                for r in conn.execute(q.release_claim(token)):
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
        try:
            with self.connector.claim_session() as (conn, cur):
                call.pid = cur.connection.info.backend_pid
                snap, wants, leased = self._lease_pg(cur, snap, call)
                if wants and not leased.rows and not call.fresh:
                    snap, wants, leased = self._lease_pg(cur, None, call)
                if not wants:
                    snaps[worker_id] = snap
                    return []
                claimed, got, infos, report = decode_claim(leased, call.token, wants)
                if ttl > 0 and snap.apply(wants, free_slots, got, report[0] or [],
                                          report[1] or []):
                    snaps[worker_id] = snap
                return self._micro_batches(conn, claimed, now, infos)
        except Exception as exc:
            # the claim statement commits on its own (autocommit): whatever failed after it,
            # or took its reply, its jobs are leased to nobody unless given back. A lost
            # connection's statement may still be running on the server: end it first.
            if call.token is not None:
                if isinstance(exc, errors.ConnectionLost):
                    self._end_backend(call.pid)
                self._release_lost_claim(call.token)
            raise

    def _end_backend(self, pid: int | None) -> None:
        """Terminate the server process of a claim connection that broke, waiting (up to
        5 s) until it has gone: its statement has then committed or rolled back, so a
        release afterwards sees every job it leased."""
        if pid is None:
            return
        try:
            with self.connector.begin() as conn:
                conn.execute(q.terminate_backend(pid))
        except Exception as e:  # noqa: BLE001  the server is away: nothing of it runs either
            log.warning("could not end the server process of a lost claim (%s): %s", pid, e)

    def _lease_pg(self, cur, snap, call: _PgClaim) -> tuple:
        """Plan from snap (None: read a fresh one; a cached one's short plan is made again
        from a fresh one) and lease the plan in one statement. Returns (the snapshot, the
        wanted (group, count) pairs, the claim statement's Rows); no pairs when nothing is
        planned."""
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
            return snap, [], NO_ROWS
        call.token = uuid.uuid4().hex
        wants = wanted_groups(plan)
        leased = claim_rows(cur, wants, call.free_slots, now=now, worker_id=call.worker_id,
                            token=call.token, expires=call.expires, floor=plan.floor,
                            touch=touch, hot=hot_ids, warm=warm_ids, unseen=snap.unseen_filter())
        return snap, wants, leased

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

    def _claim_once(self, worker_id, hot, warm, free_slots, lease_seconds, max_adapters):
        """SQLite: one serialized (BEGIN IMMEDIATE) transaction."""
        now = self.now()
        live_after = now - timedelta(seconds=self.worker_ttl_seconds)
        with self.connector.begin() as conn:
            hot_ids, warm_ids = self._adapter_ids(conn, hot), self._adapter_ids(conn, warm)
            self._touch_worker(conn, worker_id, hot_ids, warm_ids, None, now)
            groups, tenants = self._snapshot_groups(conn, hot_ids | warm_ids, now)
            if not groups:
                return []
            elsewhere, workers, capacity = set(), 0, 0
            # This worker's row included (touched above).
            for w in conn.execute(q.live_workers(live_after)):
                workers += 1
                if w.id == worker_id:
                    capacity = w.capacity or 0
                else:
                    elsewhere |= {x for x in w.hot or [] if isinstance(x, int)}
            plan = plan_claim(Snapshot(
                groups=groups, now=epoch_seconds(now), free_slots=free_slots, hot=hot_ids,
                warm=warm_ids, hot_elsewhere=elsewhere - hot_ids,
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
            got = conn.execute(q.claim_group(take.group, take.count, now, worker_id, token,
                                             expires)).all()
            if got:
                taken[take.group.key] = taken.get(take.group.key, 0) + len(got)
                rows.extend(got)
        self._charge(conn, taken, tenants, plan.floor)
        return rows

    def _charge(self, conn, taken: dict, tenants: dict, floor: float) -> None:
        """queue_groups -= claimed and tenants' fair-share counters += claimed/weight, in the
        sorted lock order (groups, then tenants) that every writer follows."""
        for key, n in sorted(taken.items()):
            conn.execute(q.charge_group(key, n))
        per_tenant: dict[str, int] = {}
        for (t, _, _), n in taken.items():
            per_tenant[t] = per_tenant.get(t, 0) + n
        for t, n in sorted(per_tenant.items()):
            conn.execute(q.charge_tenant(t, floor, n / max(tenants[t].weight, 1e-9)))

    def _snapshot_groups(self, conn, affinity_ids: set[int], now) -> tuple[list[Group], dict]:
        stmt = getattr(self, "_snapshot_stmt", None)
        if stmt is None:
            stmt = self._snapshot_stmt = q.snapshot_groups(
                conn.dialect.name, overdue=OVERDUE, by_priority=PRIORITY, per_tenant=PER_TENANT)
        rows = conn.execute(stmt, {"affinity": sorted(affinity_ids)}).all()
        return self._groups_of(rows, now)

    def _groups_of(self, rows, now) -> tuple[list[Group], dict]:
        far = epoch_seconds(now) + 1e9
        tenants = {r.tenant_id: r for r in rows}
        return [Group(r.tenant_id, r.adapter_id, r.priority, r.queued_count,
                      epoch_seconds(r.oldest_enqueued_at) if r.oldest_enqueued_at is not None
                      else far) for r in rows], tenants

    def _adapter_ids(self, conn, refs) -> set[int]:
        return set(adapter_ids(refs, "hot/warm"))

    def _touch_worker(self, conn, worker_id, hot_ids, warm_ids, capacity, now) -> None:
        # Adapters are stored as ids, so other claims compare them without a name lookup.
        conn.execute(q.touch_worker(conn.dialect.name, worker_id, now, sorted(hot_ids),
                                    sorted(warm_ids), capacity))
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
                for r in conn.execute(q.adapters(missing)):
                    infos[r.id] = adapter_info(r)
                    cache[r.id] = (infos[r.id], clock + ADAPTER_CACHE_S)
        out = _Claimed()
        for adapter_id, jobs in claimed.items():
            if adapter_id != 0 and adapter_id not in infos:
                conn.execute(q.fail_jobs([j.id for j in jobs], now, (
                    f"adapter {jobs[0].adapter!r} (id {adapter_id}) was deleted")))
                out.failed += len(jobs)
                continue
            out.append(MicroBatch(adapter=infos.get(adapter_id), jobs=jobs))
        return out


class _Claimed(list):
    """A claim's micro-batches, and how many jobs it leased and failed (a deleted adapter's)."""

    failed = 0


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
    pid: int | None = None           # the claim connection's server process


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
