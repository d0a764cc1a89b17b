"""Writes fenced by (job id, lease token): complete, fail (retry with backoff), release and
heartbeat. A stale token changes nothing. JobQueue mixin."""
from __future__ import annotations

import random
from datetime import timedelta

from lorry.scheduler.db import add_to_groups
from lorry.scheduler.models import Job
from lorry.scheduler.types import Result
from sqlalchemy import select, tuple_, update

J = Job.__table__


class LeaseOps:
    def complete(self, job_id: str, lease_token: str, result: Result, *,
                 cancelled: bool = False) -> bool:
        """Record the result; False (nothing changed) when the lease is not held any more.

        cancelled=True records a job the worker stopped on a cancel request: status
        "cancelled", with the partial output kept as its result.
        """
        now = self.now()
        with self.engine.begin() as conn:
            res = conn.execute(update(J).where(
                J.c.id == job_id, J.c.lease_token == lease_token, J.c.status == "running")
                .values(status="cancelled" if cancelled else "succeeded", finished_at=now,
                        lease_token=None, lease_expires_at=None, result_text=result.text,
                        result_token_ids=list(result.token_ids),
                        finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                        timings=dict(result.timings or {}), error=None))
        return res.rowcount == 1

    def backoff_seconds(self, attempts: int) -> float:
        """Exponential backoff with full jitter after the given number of attempts."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(attempts - 1, 0))
        return random.uniform(cap / 2, cap)

    def fail(self, job_id: str, lease_token: str, error: str, retryable: bool = True) -> bool:
        """Retryable and attempts left: queued again after a backoff; else failed. The error
        is kept either way. False (nothing changed) when the lease is not held any more."""
        now = self.now()
        with self.engine.begin() as conn:
            row = conn.execute(select(J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.attempts,
                                      J.c.max_attempts, J.c.cancel_requested).where(
                J.c.id == job_id, J.c.lease_token == lease_token, J.c.status == "running")
                .with_for_update()).first()
            if row is None:
                return False
            fenced = update(J).where(J.c.id == job_id, J.c.lease_token == lease_token)
            if retryable and row.attempts < row.max_attempts and not row.cancel_requested:
                when = now + timedelta(seconds=self.backoff_seconds(row.attempts))
                conn.execute(fenced.values(status="queued", worker_id=None, lease_token=None,
                                           lease_expires_at=None, not_before=when,
                                           enqueued_at=when, error=str(error)))
                add_to_groups(conn, {(row.tenant_id, row.adapter_id, row.priority): (1, when)})
            else:
                status = "cancelled" if row.cancel_requested else "failed"
                conn.execute(fenced.values(status=status, finished_at=now, lease_token=None,
                                           lease_expires_at=None, error=str(error)))
        return True

    def release(self, job_id: str, lease_token: str) -> bool:
        """Give the job back to the queue at its old place; the attempt is not counted."""
        with self.engine.begin() as conn:
            row = conn.execute(update(J).where(
                J.c.id == job_id, J.c.lease_token == lease_token, J.c.status == "running")
                .values(status="queued", worker_id=None, lease_token=None,
                        lease_expires_at=None, attempts=J.c.attempts - 1)
                .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority, J.c.enqueued_at)).first()
            if row is None:
                return False
            add_to_groups(conn, {(row.tenant_id, row.adapter_id, row.priority):
                                 (1, row.enqueued_at)})
        return True

    def heartbeat(self, worker_id: str, leases: list[tuple[str, str]], hot: list, warm: list,
                  capacity: int, lease_seconds: float = 60) -> set[str]:
        """Extend the given leases and record the worker's state. Returns the job ids to stop:
        cancel requested, or the lease is no longer this worker's (reaped, expired, taken)."""
        now = self.now()
        pairs = [(j, t) for j, t in leases]
        with self.engine.begin() as conn:
            hot_ids, warm_ids = self._adapter_ids(conn, hot), self._adapter_ids(conn, warm)
            self._touch_worker(conn, worker_id, hot_ids, warm_ids, capacity, now)
            if not pairs:
                return set()
            rows = conn.execute(update(J).where(
                tuple_(J.c.id, J.c.lease_token).in_(pairs), J.c.status == "running")
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                .returning(J.c.id, J.c.cancel_requested)).all()
        held = {r.id for r in rows}
        return {r.id for r in rows if r.cancel_requested} | {j for j, _ in pairs if j not in held}
