"""Writes fenced by (job id, lease token): complete, fail (retry with backoff), release and
heartbeat. A stale token changes nothing. JobQueue mixin."""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select, text, tuple_, update

from lorry.scheduler.db import add_to_groups
from lorry.scheduler.models import Job
from lorry.scheduler.types import Result

J = Job.__table__

# Many results in one statement, each row still fenced by its own (id, lease token).
COMPLETE_MANY_PG = text("""
UPDATE jobs AS j SET status = v.status, finished_at = :now, lease_token = NULL,
  lease_expires_at = NULL, result_text = v.text, result_token_ids = CAST(v.token_ids AS json),
  finish_reason = v.finish_reason, prompt_tokens = v.prompt_tokens,
  completion_tokens = v.completion_tokens, timings = CAST(v.timings AS json),
  result_logprobs = CAST(v.logprobs AS json), error = NULL
FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[]), CAST(:statuses AS text[]),
            CAST(:texts AS text[]), CAST(:token_ids AS text[]), CAST(:finish AS text[]),
            CAST(:prompt_tokens AS int[]), CAST(:completion_tokens AS int[]),
            CAST(:timings AS text[]), CAST(:logprobs AS text[]))
  AS v(id, token, status, text, token_ids, finish_reason, prompt_tokens, completion_tokens,
       timings, logprobs)
WHERE j.id = v.id AND j.lease_token = v.token AND j.status = 'running'
RETURNING j.id
""")


class LeaseOps:
    def complete(self, job_id: str, lease_token: str, result: Result, *,
                 cancelled: bool = False) -> bool:
        """Record the result; False (nothing changed) when the lease is not held any more.

        cancelled=True records a job the worker stopped on a cancel request: status
        "cancelled", with the partial output kept as its result.
        """
        with self.engine.begin() as conn:
            return self._complete(conn, job_id, lease_token, result, cancelled, self.now())

    @staticmethod
    def _complete(conn, job_id: str, lease_token: str, result: Result, cancelled: bool,
                  now) -> bool:
        res = conn.execute(update(J).where(
            J.c.id == job_id, J.c.lease_token == lease_token, J.c.status == "running")
            .values(status="cancelled" if cancelled else "succeeded", finished_at=now,
                    lease_token=None, lease_expires_at=None, result_text=result.text,
                    result_token_ids=list(result.token_ids),
                    finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    timings=dict(result.timings or {}),
                    result_logprobs=None if result.logprobs is None else list(result.logprobs),
                    error=None))
        return res.rowcount == 1

    def complete_many(self, items: Sequence[tuple[str, str, Result, bool]]) -> set[str]:
        """Record many results in one transaction: items of (job id, lease token, result,
        cancelled). Returns the ids recorded; a job whose lease is not held any more is left
        as it is, exactly as ``complete`` leaves it."""
        if not items:
            return set()
        now = self.now()
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                rows = conn.execute(COMPLETE_MANY_PG, dict(
                    now=now, ids=[i[0] for i in items], tokens=[i[1] for i in items],
                    statuses=["cancelled" if i[3] else "succeeded" for i in items],
                    texts=[i[2].text for i in items],
                    token_ids=[json.dumps(list(i[2].token_ids)) for i in items],
                    finish=[i[2].finish_reason for i in items],
                    prompt_tokens=[i[2].prompt_tokens for i in items],
                    completion_tokens=[i[2].completion_tokens for i in items],
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
