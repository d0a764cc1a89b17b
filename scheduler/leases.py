"""Writes fenced by (job id, lease token): complete, fail (retry with backoff), release and
heartbeat. A stale token changes nothing. JobQueue mixin."""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import timedelta

from lorry.scheduler import queries as q
from lorry.scheduler.db import add_to_groups
from lorry.scheduler.types import Result

MAX_ERROR_CHARS = 4000  # a job's stored error (an adapter's tensor names can be 100 MB)


def clip_error(text: str) -> str:
    """The error as stored and answered: its head and tail, the middle cut when too long."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    cut = len(text) - MAX_ERROR_CHARS
    return f"{text[:MAX_ERROR_CHARS - 1000]} [... {cut} characters cut ...] {text[-1000:]}"


class LeaseOps:
    def complete(self, job_id: str, lease_token: str, result: Result, *,
                 cancelled: bool = False) -> bool:
        """Record the result; False (nothing changed) when the lease is not held any more.

        cancelled=True records a job the worker stopped on a cancel request: status
        "cancelled", with the partial output kept as its result.
        """
        with self.connector.begin() as conn:
            return self._complete(conn, job_id, lease_token, result, cancelled, self.now())

    @staticmethod
    def _complete(conn, job_id: str, lease_token: str, result: Result, cancelled: bool,
                  now) -> bool:
        res = conn.execute(q.complete_job(job_id, lease_token, result, now=now,
                                          status="cancelled" if cancelled else "succeeded"))
        return res.rowcount == 1

    def complete_many(self, items: Sequence[tuple[str, str, Result, bool]]) -> set[str]:
        """Record many results in one transaction: items of (job id, lease token, result,
        cancelled). Returns the ids recorded; a job whose lease is not held any more is left
        as it is, exactly as ``complete`` leaves it."""
        if not items:
            return set()
        now = self.now()
        with self.connector.begin() as conn:
            if conn.dialect.name == "postgresql":
                rows = conn.execute(q.COMPLETE_MANY_PG, dict(
                    now=now, ids=[i[0] for i in items], tokens=[i[1] for i in items],
                    statuses=["cancelled" if i[3] else "succeeded" for i in items],
                    texts=[i[2].text for i in items],
                    token_ids=[json.dumps(list(i[2].token_ids)) for i in items],
                    finish=[i[2].finish_reason for i in items],
                    prompt_tokens=[i[2].prompt_tokens for i in items],
                    completion_tokens=[i[2].completion_tokens for i in items],
                    cached_tokens=[i[2].cached_tokens for i in items],
                    timings=[json.dumps(dict(i[2].timings or {})) for i in items],
                    logprobs=[None if i[2].logprobs is None else json.dumps(i[2].logprobs)
                              for i in items])).all()
                return {r.id for r in rows}
            written = set()
            for job_id, lease_token, result, cancelled in items:
                if self._complete(conn, job_id, lease_token, result, cancelled, now):
                    written.add(job_id)
            return written

    def backoff_seconds(self, attempts: int) -> float:
        """Exponential backoff with full jitter after the given number of attempts."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(attempts - 1, 0))
        return random.uniform(cap / 2, cap)

    def fail(self, job_id: str, lease_token: str, error: str,
             retryable: bool = True) -> str | bool:
        """Retryable and attempts left: queued again after a backoff; else failed. The error
        is kept either way. Returns the job's status now ("queued", "failed" or "cancelled"
        when a cancel was requested); False (nothing changed) when the lease is not held any
        more."""
        now = self.now()
        error = clip_error(str(error))
        with self.connector.begin() as conn:
            row = conn.execute(q.running_job_for_update(job_id, lease_token)).first()
            if row is None:
                return False
            if retryable and row.attempts < row.max_attempts and not row.cancel_requested:
                when = now + timedelta(seconds=self.backoff_seconds(row.attempts))
                conn.execute(q.retry_job(job_id, lease_token, when, str(error)))
                add_to_groups(conn, {(row.tenant_id, row.adapter_id, row.priority): (1, when)})
                return "queued"
            status = "cancelled" if row.cancel_requested else "failed"
            conn.execute(q.end_job(job_id, lease_token, status, now, str(error)))
        return status

    def release(self, job_id: str, lease_token: str) -> bool | str:
        """Give the job back to the queue at its old place; the attempt is not counted
        (True). A job whose cancel was asked ends cancelled instead ("cancelled": its worker
        stopped before it learnt). False: the lease is not held any more."""
        with self.connector.begin() as conn:
            if conn.execute(q.cancel_released_job(job_id, lease_token, self.now())).first():
                return "cancelled"
            row = conn.execute(q.release_job(job_id, lease_token)).first()
            if row is None:
                return False
            add_to_groups(conn, {(row.tenant_id, row.adapter_id, row.priority):
                                 (1, row.enqueued_at)})
        return True

    def cancels_requested(self, job_ids: list[str]) -> set[str]:
        """The running jobs among job_ids whose cancel was asked: a read, cheap enough to run
        every second between heartbeats so that a cancel stops its job promptly."""
        if not job_ids:
            return set()
        with self.connector.connect() as conn:
            return {r.id for r in conn.execute(q.cancels_asked(list(job_ids)))}

    def heartbeat(self, worker_id: str, leases: list[tuple[str, str]], hot: list, warm: list,
                  capacity: int, lease_seconds: float = 60) -> set[str]:
        """Extend the given leases and record the worker's state. Returns the job ids to stop:
        cancel requested, or the lease is no longer this worker's (reaped, expired, taken)."""
        now = self.now()
        pairs = [(j, t) for j, t in leases]
        with self.connector.begin() as conn:
            hot_ids, warm_ids = self._adapter_ids(conn, hot), self._adapter_ids(conn, warm)
            self._touch_worker(conn, worker_id, hot_ids, warm_ids, capacity, now)
            if not pairs:
                return set()
            rows = conn.execute(q.extend_leases(
                pairs, now + timedelta(seconds=lease_seconds))).all()
        held = {r.id for r in rows}
        return {r.id for r in rows if r.cancel_requested} | {j for j, _ in pairs if j not in held}
