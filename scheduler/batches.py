"""OpenAI-Batch-shaped groups of jobs: create, read, cancel, finalize, stream results.
JobQueue mixin."""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import exists, func, select, update

from lorry.scheduler import errors
from lorry.scheduler.db import add_to_groups
from lorry.scheduler.models import Batch, Job
from lorry.scheduler.rows import batch_info, job_info
from lorry.scheduler.types import BatchInfo, JobInfo, JobSpec

B, J = Batch.__table__, Job.__table__
OPEN = ("validating", "in_progress", "finalizing", "cancelling")


def window_seconds(window: str) -> int:
    m = re.fullmatch(r"(\d+)h", window) if isinstance(window, str) else None
    if m is None or not 1 <= int(m.group(1)) <= 24 * 7:
        raise errors.InvalidJob(f"completion_window must be like '24h' (1h to 168h), "
                                f"got {window!r}")
    return int(m.group(1)) * 3600


class BatchOps:
    def create_batch(self, tenant_id: str, specs: list[JobSpec], metadata: dict | None = None,
                     completion_window: str = "24h") -> BatchInfo:
        """Queue specs as one batch (each needs a unique custom_id); jobs get the batch's
        expiry as their deadline. Raises like submit; nothing is queued on error."""
        seconds = window_seconds(completion_window)
        specs = list(specs)
        if not specs:
            raise errors.InvalidJob("a batch needs at least one request, got 0")
        seen: set = set()
        for i, s in enumerate(specs):
            if not isinstance(s, JobSpec) or not s.custom_id:
                raise errors.InvalidJob(f"batch request #{i} needs a custom_id")
            if s.custom_id in seen:
                raise errors.InvalidJob(f"batch request #{i}: duplicate custom_id "
                                        f"{s.custom_id!r} (custom_ids must be unique)")
            seen.add(s.custom_id)
        if metadata is not None and not isinstance(metadata, dict):
            raise errors.InvalidJob(f"metadata must be a dict or None, got {metadata!r}")
        from lorry.scheduler.jobs import unstorable, validate_spec
        problem = unstorable(metadata)
        if problem:
            raise errors.InvalidJob(f"metadata contains {problem}, which the batch table "
                                    "cannot store; remove it")
        for i, s in enumerate(specs):
            validate_spec(s, i)
        now = self.now()
        batch_id = f"batch_{uuid.uuid4().hex}"
        row = dict(id=batch_id, tenant_id=tenant_id, status="in_progress",
                   completion_window=completion_window, total=len(specs), completed=0,
                   failed=0, metadata=metadata, created_at=now, in_progress_at=now,
                   expires_at=now + timedelta(seconds=seconds))
        with self.engine.begin() as conn:
            from lorry.scheduler.models import Tenant
            if conn.execute(select(Tenant.id).where(Tenant.id == tenant_id)).first() is None:
                raise errors.UnknownTenant(f"tenant {tenant_id!r} does not exist")
            conn.execute(B.insert(), row)
            self._submit(conn, tenant_id, specs, batch_id=batch_id,
                         deadline_cap=row["expires_at"])
            return self._batch(conn, batch_id, tenant_id)

    def _batch(self, conn, batch_id: str, tenant_id: str | None) -> BatchInfo | None:
        cond = [B.c.id == batch_id] + ([B.c.tenant_id == tenant_id] if tenant_id else [])
        row = conn.execute(select(B).where(*cond)).first()
        if row is None:
            return None
        if row.status in OPEN:
            by_status = dict(conn.execute(select(J.c.status, func.count()).where(
                J.c.batch_id == batch_id).group_by(J.c.status)).all())
            done = by_status.get("succeeded", 0)
            counts = dict(total=row.total, completed=done,
                          failed=sum(by_status.get(s, 0) for s in
                                     ("failed", "cancelled", "expired")))
        else:
            counts = dict(total=row.total, completed=row.completed, failed=row.failed)
        return batch_info(row, counts)

    def get_batch(self, batch_id: str, tenant_id: str | None) -> BatchInfo | None:
        with self.engine.connect() as conn:
            return self._batch(conn, batch_id, tenant_id)

    def cancel_batch(self, batch_id: str, tenant_id: str | None) -> BatchInfo | None:
        """Queued jobs are cancelled now, running ones flagged; the batch is "cancelling"
        until finalize_batches sees every job terminal, then "cancelled"."""
        now = self.now()
        with self.engine.begin() as conn:
            info = self._batch(conn, batch_id, tenant_id)
            if info is None or info.status not in ("validating", "in_progress"):
                return info
            conn.execute(update(B).where(B.c.id == batch_id).values(
                status="cancelling", cancelling_at=now))
            rows = conn.execute(update(J).where(J.c.batch_id == batch_id,
                                                J.c.status == "queued")
                                .values(status="cancelled", finished_at=now)
                                .returning(J.c.tenant_id, J.c.adapter_id, J.c.priority,
                                           J.c.enqueued_at)).all()
            deltas: dict = {}
            for r in rows:
                key = (r.tenant_id, r.adapter_id, r.priority)
                deltas[key] = (deltas.get(key, (0, r.enqueued_at))[0] - 1, r.enqueued_at)
            add_to_groups(conn, deltas)
            conn.execute(update(J).where(J.c.batch_id == batch_id, J.c.status == "running")
                         .values(cancel_requested=True))
            return self._batch(conn, batch_id, tenant_id)

    def finalize_batches(self) -> int:
        """Batches whose jobs are all terminal become completed, expired (some job expired)
        or cancelled (cancel was asked); returns how many changed."""
        now, changed = self.now(), 0
        pending = exists().where(J.c.batch_id == B.c.id, J.c.status.in_(("queued", "running")))
        with self.engine.begin() as conn:
            ids = conn.execute(select(B.c.id, B.c.status).where(
                B.c.status.in_(OPEN), ~pending)).all()
            for batch_id, status in ids:
                by_status = dict(conn.execute(select(J.c.status, func.count()).where(
                    J.c.batch_id == batch_id).group_by(J.c.status)).all())
                failed = sum(by_status.get(s, 0) for s in ("failed", "cancelled", "expired"))
                values = dict(completed=by_status.get("succeeded", 0), failed=failed)
                if status == "cancelling":
                    values.update(status="cancelled", cancelled_at=now)
                elif by_status.get("expired", 0):
                    values.update(status="expired", expired_at=now)
                else:
                    values.update(status="completed", finalizing_at=now, completed_at=now)
                conn.execute(update(B).where(B.c.id == batch_id).values(**values))
                changed += 1
        return changed

    def batch_results(self, batch_id: str, tenant_id: str | None) -> Iterator[JobInfo]:
        """Every job of the batch in input order, read in pages (constant memory)."""
        last = -1
        while True:
            with self.engine.connect() as conn:
                cond = [J.c.batch_id == batch_id, J.c.seq > last]
                if tenant_id:
                    cond.append(J.c.tenant_id == tenant_id)
                rows = conn.execute(select(J).where(*cond).order_by(J.c.seq).limit(1000)).all()
            for r in rows:
                yield job_info(r)
            if len(rows) < 1000:
                return
            last = rows[-1].seq
