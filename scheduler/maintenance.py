"""Periodic upkeep: reap expired leases, expire deadlines, prune dead workers. JobQueue mixin."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from lorry.scheduler.db import add_to_groups, insert_for
from lorry.scheduler.models import Job, MaintenanceRun, Worker

J, W, M = Job.__table__, Worker.__table__, MaintenanceRun.__table__
CHUNK = 1000
LEASE_REAPER = "lease_reaper"  # maintenance_runs row of reap_expired_leases


class MaintenanceOps:
    def reap_expired_leases(self) -> int:
        """Running jobs whose lease ran out go back to the queue (the attempt stays counted),
        or to failed when it was their last attempt, or to cancelled when that was asked.
        A finished pass is recorded (see last_reap_at); beat's maintain and claims run it."""
        now, total = self.now(), 0
        while True:
            with self.engine.begin() as conn:
                pick = (select(J.c.id).where(J.c.status == "running",
                                             J.c.lease_expires_at < now)
                        .limit(CHUNK).with_for_update(skip_locked=True)
                        .cte("picked").prefix_with("MATERIALIZED", dialect="postgresql"))
                rows = conn.execute(update(J).where(J.c.id == pick.c.id,
                                                    J.c.status == "running")
                                    .values(lease_token=None, lease_expires_at=None,
                                            worker_id=None)
                                    .returning(J.c.id, J.c.tenant_id, J.c.adapter_id,
                                               J.c.priority, J.c.attempts, J.c.max_attempts,
                                               J.c.cancel_requested, J.c.enqueued_at)).all()
                requeue, deltas = [], {}
                for r in rows:
                    if r.cancel_requested or r.attempts >= r.max_attempts:
                        continue
                    requeue.append(r.id)
                    key = (r.tenant_id, r.adapter_id, r.priority)
                    n, oldest = deltas.get(key, (0, r.enqueued_at))
                    deltas[key] = (n + 1, min(oldest, r.enqueued_at))
                done = [r for r in rows if r.id not in set(requeue)]
                if requeue:
                    conn.execute(update(J).where(J.c.id.in_(requeue)).values(
                        status="queued", error="lease expired (worker lost)"))
                for r in done:
                    conn.execute(update(J).where(J.c.id == r.id).values(
                        status="cancelled" if r.cancel_requested else "failed", finished_at=now,
                        error=None if r.cancel_requested else
                        f"lease expired on attempt {r.attempts} of {r.max_attempts}"))
                add_to_groups(conn, deltas)
                if len(rows) < CHUNK:
                    _record_run(conn, LEASE_REAPER, now)
            total += len(rows)
            if len(rows) < CHUNK:
                return total

    def last_reap_at(self) -> datetime | None:
        """When reap_expired_leases last finished a pass (naive UTC; the schema's creation
        before the first), or None when no pass was ever recorded."""
        with self.engine.connect() as conn:
            return conn.execute(select(M.c.last_run_at).where(M.c.name == LEASE_REAPER)
                                ).scalar_one_or_none()

    def expire_deadlines(self) -> int:
        """Queued or running jobs past their deadline become expired (a running job's lease
        is revoked: its worker's next heartbeat lists it to stop)."""
        now, total = self.now(), 0
        while True:
            with self.engine.begin() as conn:
                pick = (select(J.c.id).where(J.c.deadline < now,
                                             J.c.status.in_(("queued", "running")))
                        .limit(CHUNK).with_for_update(skip_locked=True)
                        .cte("picked").prefix_with("MATERIALIZED", dialect="postgresql"))
                rows = conn.execute(update(J).where(J.c.id == pick.c.id,
                                                    J.c.status.in_(("queued", "running")))
                                    .values(status="expired", finished_at=now, lease_token=None,
                                            lease_expires_at=None,
                                            error="deadline passed before the job finished")
                                    .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority,
                                               J.c.enqueued_at, J.c.started_at,
                                               J.c.worker_id)).all()
                deltas: dict = {}
                for r in rows:
                    if r.worker_id is None:  # it was queued (running rows have a worker)
                        key = (r.tenant_id, r.adapter_id, r.priority)
                        n, _ = deltas.get(key, (0, r.enqueued_at))
                        deltas[key] = (n - 1, r.enqueued_at)
                add_to_groups(conn, deltas)
            total += len(rows)
            if len(rows) < CHUNK:
                return total

    def prune_workers(self, older_than_s: float) -> int:
        """Forget workers whose last heartbeat is older than older_than_s seconds."""
        cutoff = self.now() - timedelta(seconds=older_than_s)
        with self.engine.begin() as conn:
            return conn.execute(delete(W).where(W.c.heartbeat_at < cutoff)).rowcount


def _record_run(conn, name: str, now: datetime) -> None:
    """maintenance_runs[name] = now, unless a later run is recorded (clocks of several hosts)."""
    ins = insert_for(conn.engine)(M).values(name=name, last_run_at=now)
    conn.execute(ins.on_conflict_do_update(
        index_elements=["name"], set_={"last_run_at": ins.excluded.last_run_at},
        where=M.c.last_run_at < ins.excluded.last_run_at))
