"""Periodic upkeep: reap expired leases, expire deadlines, prune dead workers. JobQueue mixin."""
from __future__ import annotations

from datetime import datetime, timedelta

from lorry.scheduler import queries as q
from lorry.scheduler.db import add_to_groups

CHUNK = 1000
LEASE_REAPER = "lease_reaper"  # maintenance_runs row of reap_expired_leases
UPKEEP = "upkeep"  # maintenance_runs row of upkeep (deadlines and batches)


class MaintenanceOps:
    def reap_expired_leases(self) -> int:
        """Running jobs whose lease ran out go back to the queue (the attempt stays counted),
        or to failed when it was their last attempt, or to cancelled when that was asked.
        A finished pass is recorded (see last_reap_at); beat's maintain and claims run it."""
        now, total = self.now(), 0
        while True:
            with self.connector.begin() as conn:
                rows = conn.execute(q.reap_expired(now, CHUNK)).all()
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
                    conn.execute(q.requeue_reaped(requeue))
                for r in done:
                    conn.execute(q.end_reaped(
                        r.id, "cancelled" if r.cancel_requested else "failed", now,
                        None if r.cancel_requested else
                        f"lease expired on attempt {r.attempts} of {r.max_attempts}"))
                add_to_groups(conn, deltas)
                if len(rows) < CHUNK:
                    conn.execute(q.record_run(conn.dialect.name, LEASE_REAPER, now))
            total += len(rows)
            if len(rows) < CHUNK:
                return total

    def last_reap_at(self) -> datetime | None:
        """When reap_expired_leases last finished a pass (naive UTC; the schema's creation
        before the first), or None when no pass was ever recorded."""
        with self.connector.connect() as conn:
            return conn.execute(q.last_run(LEASE_REAPER)).scalar_one_or_none()

    def expire_deadlines(self) -> int:
        """Queued or running jobs past their deadline become expired (a running job's lease
        is revoked: its worker's next heartbeat lists it to stop)."""
        now, total = self.now(), 0
        while True:
            with self.connector.begin() as conn:
                rows = conn.execute(q.expire_deadlines(now, CHUNK)).all()
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

    def upkeep(self, due_after_s: float | None = None) -> dict[str, int] | None:
        """Expire deadlines, finalize batches and delete expired files, and record the pass.
        ``due_after_s``: only when no process started a pass in the last ``due_after_s``
        seconds (None when another did): draining Celery workers call it so, since beat's
        maintain waits for a worker that is not draining, and under a steady load none is for
        up to LORRY_DRAIN_MAX_SECONDS."""
        now = self.now()
        with self.connector.begin() as conn:
            before = now if due_after_s is None else now - timedelta(seconds=due_after_s)
            taken = conn.execute(q.take_turn(conn.dialect.name, UPKEEP, now, before)).first()
        if taken is None and due_after_s is not None:
            return None
        return {"expired": self.expire_deadlines(), "batches_finalized": self.finalize_batches(),
                "files_expired": self.delete_expired_files()}

    def prune_workers(self, older_than_s: float) -> int:
        """Forget workers whose last heartbeat is older than older_than_s seconds."""
        cutoff = self.now() - timedelta(seconds=older_than_s)
        with self.connector.begin() as conn:
            return conn.execute(q.prune_workers(cutoff)).rowcount
