"""A batch's jobs and refused lines written chunk by chunk into its one transaction: on
PostgreSQL through one COPY that stays open across chunks, so that the server stores a chunk
while Python parses the next."""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from lorry.scheduler import errors
from lorry.scheduler import queries as q
from lorry.scheduler.copy_pg import JobCopy, NewJob
from lorry.scheduler.db import add_to_groups
from lorry.scheduler.jobs import group_deltas, new_rows
from lorry.scheduler.types import JobSpec, LineError


class BatchWriter:
    """Rows of one batch (``add`` per chunk, then ``finish``), checked as ``submit`` checks
    them: adapters resolved (each name looked up once), the tenant's max_queued quota
    (queued jobs counted once, this batch's added in Python), idempotency keys. The
    queue_groups counts are updated once, by ``finish``."""

    def __init__(self, queue, conn, tenant, batch_id: str, deadline_cap: datetime):
        self.queue, self.conn, self.tenant = queue, conn, tenant
        self.batch_id, self.deadline_cap = batch_id, deadline_cap
        self.copy = None
        if conn.dialect.name == "postgresql":
            # the ingest's one COPY stays open while the lines are parsed and checked (PostgreSQL
            # counts that time against statement_timeout, up to 200 MiB of lines): no server
            # timeout in this transaction; the deadline's watchdog still bounds each wait on the
            # server (a frozen one)
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            self.copy = JobCopy(conn)
        self.adapter_rows: dict[str, dict] = {}
        self.looked_up: set[str | None] = {None}
        self.queued: int | None = None  # the tenant's queued jobs before this batch
        self.added = 0
        self.deltas: dict = {}

    def add(self, specs: Sequence[JobSpec], seq_start: int,
            encoded: dict[int, str] | None = None) -> None:
        """Queue validated specs (positions seq_start...); ``encoded``: id(messages) -> JSON."""
        tenant_id = self.tenant.id
        names = {s.adapter for s in specs}
        missing = names - self.looked_up
        if missing:
            self._pause()
            for key, found in self.queue._adapter_rows(self.conn, [tenant_id],
                                                       missing).items():
                self.adapter_rows.setdefault(key, {}).update(found)
            self.looked_up |= missing
        adapters = self.queue._resolve_adapters(tenant_id, names, self.adapter_rows)
        existing = {}
        if any(s.idempotency_key is not None for s in specs):
            self._pause()
            existing = self.queue._known_keys(self.conn, tenant_id, list(specs))
        rows: list[NewJob] = []
        new_rows(tenant_id, list(specs), adapters, existing, rows, self.queue.now(),
                 self.batch_id, self.deadline_cap, seq_start, infos=False)
        self._check_quota(len(rows))
        if self.copy is not None:
            self.copy.write(rows, encoded)
        elif rows:
            self.conn.execute(q.INSERT_JOBS, [r.as_row() for r in rows])
        group_deltas(rows, self.deltas)

    def refuse(self, refused: Sequence[LineError]) -> None:
        """Keep refused input lines (the batch's error file)."""
        if refused:
            self._pause()
            self.conn.execute(q.INSERT_REJECTS, [
                {"batch_id": self.batch_id, "line": e.line, "custom_id": e.custom_id,
                 "code": e.code, "param": e.param, "message": e.message} for e in refused])

    def finish(self) -> None:
        """End the COPY, check the quota again under the tenant's quota lock and count the
        new jobs in queue_groups. The chunks' checks count without the lock (a batch too
        big for the quota is refused early), so the tenant's other submits do not wait for
        the whole ingest, only for its commit."""
        self._pause()
        if self.tenant.max_queued is not None and self.added:
            queued = self.queue._queued(self.conn, self.tenant.id, lock=True)
            if queued + self.added > self.tenant.max_queued:
                raise errors.QuotaExceeded(self.tenant.id, queued, self.added,
                                           self.tenant.max_queued)
        add_to_groups(self.conn, self.deltas)

    def abandon(self, error: BaseException) -> None:
        """End an unfinished COPY after an error (the transaction is rolled back)."""
        if self.copy is not None:
            self.copy.close(error)

    def _pause(self) -> None:
        if self.copy is not None:
            self.copy.pause()

    def _check_quota(self, adding: int) -> None:
        limit = self.tenant.max_queued
        if limit is None or not adding:
            return
        if self.queued is None:
            self._pause()
            self.queued = self.queue._queued(self.conn, self.tenant.id, lock=False)
        queued = self.queued + self.added
        if queued + adding > limit:
            raise errors.QuotaExceeded(self.tenant.id, queued, adding, limit)
        self.added += adding
