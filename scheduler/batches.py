"""OpenAI-Batch-shaped groups of jobs: create (streamed ingest), read, list, cancel,
finalize (building the output and error files), stream results. JobQueue mixin."""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

from lorry.scheduler import errors
from lorry.scheduler import queries as q
from lorry.scheduler.batch_files import jsonl, output_line, reject_line
from lorry.scheduler.batch_writer import BatchWriter
from lorry.scheduler.db import add_to_groups
from lorry.scheduler.jobs import unstorable, validate_spec
from lorry.scheduler.rows import batch_info, job_info
from lorry.scheduler.types import BatchInfo, JobInfo, JobSpec, LineError

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
FAILED_JOB_STATUSES = ("failed", "cancelled", "expired")
# Jobs read a page at a time to build or serve a batch's output: a row with logprobs holds
# ~0.85 MB once parsed (200 tokens x 20 top logprobs), so pages of 1,000 took a worker from
# 0.6 to 1.4 GB and the API's /output to 1.1 GB (a bulk audit); 100 keep it to ~85 MB
RESULTS_PAGE = 100
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def window_seconds(window: str) -> int:
    m = re.fullmatch(r"(\d+)h", window) if isinstance(window, str) else None
    if m is None or not 1 <= int(m.group(1)) <= 24 * 7:
        raise errors.InvalidJob(f"completion_window must be like '24h' (1h to 168h), "
                                f"got {window!r}")
    return int(m.group(1)) * 3600


def _check_fields(metadata, idempotency_key) -> None:
    if metadata is not None and not isinstance(metadata, dict):
        raise errors.InvalidJob(f"metadata must be a dict or None, got {metadata!r}")
    problem = unstorable(metadata) or unstorable(idempotency_key)
    if problem:
        raise errors.InvalidJob(f"metadata or idempotency key contains {problem}, which "
                                "the batch table cannot store; remove it")


class BatchOps:
    def create_batch(self, tenant_id: str, specs: list[JobSpec], metadata: dict | None = None,
                     completion_window: str = "24h") -> BatchInfo:
        """Queue specs as one batch (each needs a unique custom_id); jobs get the batch's
        expiry as their deadline. Raises like submit; nothing is queued on error."""
        specs = list(specs)
        if not specs:
            raise errors.InvalidJob("a batch needs at least one request, got 0")
        info, _ = self.ingest_batch(tenant_id, [(specs, [])], metadata=metadata,
                                    completion_window=completion_window)
        return info

    def ingest_batch(self, tenant_id: str,
                     chunks: Iterable[tuple[Sequence[JobSpec], Sequence[LineError]]], *,
                     endpoint: str | None = None, completion_window: str = "24h",
                     metadata: dict | None = None, input_file_id: str | None = None,
                     model: str | None = None, idempotency_key: str | None = None,
                     output_expires_seconds: int | None = None) -> tuple[BatchInfo, bool]:
        """Create a batch from chunks of (accepted specs, refused lines), read one chunk at
        a time into one transaction (an error from the chunks or a check rolls back all).

        Each spec needs a custom_id, unique in the batch; jobs get the batch's expiry as
        their deadline and their position in it (across chunks) as order. Refused lines are
        kept (``batch_errors``, the error file) and counted in total and failed. A batch
        with no accepted line is created "failed", its error file built now; otherwise it
        is "in_progress". ``model`` is the base model's name in output lines. Returns
        (batch, created): a known idempotency_key returns that batch, reading no chunk.
        ``endpoint=None``: the requests' own (chat or text completions, else "mixed").
        ``output_expires_seconds``: its output and error files expire that long after they
        are built (OpenAI's output_expires_after; the maintenance pass deletes them).
        """
        seconds = window_seconds(completion_window)
        _check_fields(metadata, idempotency_key)
        if idempotency_key is not None:
            known = self._batch_by_key(tenant_id, idempotency_key)
            if known is not None:
                return known, False
        now = self.now()
        row = dict(id=f"batch_{uuid.uuid4().hex}", tenant_id=tenant_id, status="validating",
                   completion_window=completion_window, total=0, completed=0, failed=0,
                   metadata=metadata, created_at=now, expires_at=now + timedelta(seconds=seconds),
                   endpoint=endpoint, input_file_id=input_file_id, model=model, rejected=0,
                   idempotency_key=idempotency_key, output_expires_seconds=output_expires_seconds)
        try:
            return self._ingest(row, chunks), True
        except errors.DuplicateKey:
            # A concurrent create with the same key won: answer with its batch.
            known = None if idempotency_key is None else self._batch_by_key(tenant_id,
                                                                            idempotency_key)
            if known is None:
                raise
            return known, False

    def _ingest(self, row: dict, chunks) -> BatchInfo:
        """Insert the batch row, write every chunk and settle the batch's status, in one
        transaction."""
        batch_id, tenant_id, now = row["id"], row["tenant_id"], row["created_at"]
        with self.connector.begin() as conn:
            tenant = conn.execute(q.tenant(tenant_id)).first()
            if tenant is None:
                raise errors.UnknownTenant(f"tenant {tenant_id!r} does not exist")
            conn.execute(q.INSERT_BATCH, row)
            writer = BatchWriter(self, conn, tenant, batch_id, row["expires_at"])
            try:
                accepted, rejected, kinds = self._write_chunks(writer, chunks)
            except BaseException as e:
                writer.abandon(e)
                raise
            values = dict(total=accepted + rejected, rejected=rejected)
            if row["endpoint"] is None:
                values["endpoint"] = kinds.pop() if len(kinds) == 1 else \
                    ("mixed" if kinds else None)
            if accepted:
                values.update(status="in_progress", in_progress_at=now)
            else:
                values.update(status="failed", failed_at=now, failed=rejected,
                              input_tokens=0, output_tokens=0, cached_tokens=0,  # nothing ran
                              error_file_id=self._error_file(
                                  conn, batch_id, tenant_id, row["model"],
                                  row["output_expires_seconds"]))
            conn.execute(q.update_batch(batch_id, **values))
            return self._batch(conn, batch_id, tenant_id)

    @staticmethod
    def _write_chunks(writer: BatchWriter, chunks) -> tuple[int, int, set[str]]:
        """Check and write every chunk; (accepted, rejected, the endpoints of accepted)."""
        seen: set = set()
        accepted = rejected = 0
        kinds: set[str] = set()
        for specs, refused in chunks:
            checked: set[int] = set()  # sampling dicts of this chunk found storable
            encoded: dict[int, str] = {}  # id(messages) -> JSON, encoded by the check
            for i, s in enumerate(specs):
                where = accepted + i
                if not isinstance(s, JobSpec) or not s.custom_id:
                    raise errors.InvalidJob(f"batch request #{where} needs a custom_id")
                if s.custom_id in seen:
                    raise errors.InvalidJob(
                        f"batch request #{where}: duplicate custom_id "
                        f"{s.custom_id!r} (custom_ids must be unique)")
                seen.add(s.custom_id)
                validate_spec(s, where, checked, encoded)
                kinds.add(CHAT if s.messages is not None else COMPLETIONS)
            if specs:
                writer.add(specs, accepted, encoded)
                accepted += len(specs)
            writer.refuse(refused)
            rejected += len(refused)
        writer.finish()
        return accepted, rejected, kinds

    def batch_by_key(self, tenant_id: str, key: str) -> BatchInfo | None:
        """The tenant's batch created with this idempotency key, or None."""
        return self._batch_by_key(tenant_id, key)

    def _batch_by_key(self, tenant_id: str, key: str) -> BatchInfo | None:
        with self.connector.connect() as conn:
            found = conn.execute(q.batch_id_by_key(tenant_id, key)).scalar()
            return None if found is None else self._batch(conn, found, tenant_id)

    @staticmethod
    def _job_counts(conn, batch_id: str) -> dict[str, int]:
        return {r.status: r.n for r in conn.execute(q.batch_job_counts(batch_id))}

    def _batch(self, conn, batch_id: str, tenant_id: str | None) -> BatchInfo | None:
        row = conn.execute(q.batch(batch_id, tenant_id)).first()
        if row is None:
            return None
        if row.status in OPEN:
            by_status = self._job_counts(conn, batch_id)
            counts = dict(total=row.total, completed=by_status.get("succeeded", 0),
                          failed=(row.rejected or 0) + sum(by_status.get(s, 0)
                                                           for s in FAILED_JOB_STATUSES))
        else:
            counts = dict(total=row.total, completed=row.completed, failed=row.failed)
        return batch_info(row, counts)

    def get_batch(self, batch_id: str, tenant_id: str | None) -> BatchInfo | None:
        with self.connector.connect() as conn:
            return self._batch(conn, batch_id, tenant_id)

    def cancel_batch(self, batch_id: str, tenant_id: str | None) -> BatchInfo | None:
        """Queued jobs are cancelled now, running ones flagged; the batch is "cancelling"
        until finalize_batches sees every job terminal, then "cancelled"."""
        now = self.now()
        with self.connector.begin() as conn:
            # The row first (waiting for a finalizer that holds it): a status read without
            # it could be "in_progress" while the finalizer commits "completed", and the
            # cancel would then reopen a finished batch.
            conn.execute(q.batch_for_update(batch_id, tenant_id)).first()
            info = self._batch(conn, batch_id, tenant_id)
            if info is None or info.status not in ("validating", "in_progress"):
                return info
            conn.execute(q.update_batch(batch_id, status="cancelling", cancelling_at=now))
            rows = conn.execute(q.cancel_queued_batch_jobs(batch_id, now)).all()
            deltas: dict = {}
            for r in rows:
                key = (r.tenant_id, r.adapter_id, r.priority)
                deltas[key] = (deltas.get(key, (0, r.enqueued_at))[0] - 1, r.enqueued_at)
            add_to_groups(conn, deltas)
            conn.execute(q.request_cancel_batch_jobs(batch_id))
            return self._batch(conn, batch_id, tenant_id)

    def finalize_batches(self) -> int:
        """Batches whose jobs are all terminal become "finalizing", get their output file
        (succeeded requests) and error file (refused lines, failed, cancelled and expired
        requests) built, then become cancelled (cancel was asked), expired (some job
        expired) or completed; returns how many were finished. A batch left "finalizing"
        by a crash is finished by the next call (the files are built in one transaction)."""
        with self.connector.connect() as conn:
            ids = [r.id for r in conn.execute(q.finished_batches(OPEN)).all()]
        return sum(self._finalize(batch_id) for batch_id in ids)

    def _lock_batch(self, conn, batch_id: str):
        return conn.execute(q.lock_batch(conn.dialect.name, batch_id, OPEN)).first()

    def _finalize(self, batch_id: str) -> bool:
        with self.connector.begin() as conn:
            row = self._lock_batch(conn, batch_id)
            if row is None:
                return False
            if row.status != "finalizing":
                conn.execute(q.update_batch(batch_id, status="finalizing",
                                            finalizing_at=self.now()))
        with self.connector.begin() as conn:
            row = self._lock_batch(conn, batch_id)
            if row is None or row.status != "finalizing":
                return False
            by_status = self._job_counts(conn, batch_id)
            if by_status.get("queued") or by_status.get("running"):
                return False  # a job went back to the queue meanwhile (reaped lease)
            now = self.now()
            failed = (row.rejected or 0) + sum(by_status.get(s, 0) for s in FAILED_JOB_STATUSES)
            values = dict(completed=by_status.get("succeeded", 0), failed=failed)
            if row.cancelling_at is not None:
                values.update(status="cancelled", cancelled_at=now)
            elif by_status.get("expired", 0):
                values.update(status="expired", expired_at=now)
            else:
                values.update(status="completed", completed_at=now)
            usage = [0, 0, 0]           # summed while the output file is written

            def succeeded():
                for job in self._results(conn, batch_id, ("succeeded",)):
                    if job.result is not None:
                        usage[0] += job.result.prompt_tokens or 0
                        usage[1] += job.result.completion_tokens or 0
                        usage[2] += job.result.cached_tokens or 0
                    yield jsonl(output_line(job, row.model))
            values["output_file_id"] = self.build_file(
                conn, row.tenant_id, succeeded(), filename=f"{batch_id}_output.jsonl",
                batch_id=batch_id, expires_after_s=row.output_expires_seconds)
            values["input_tokens"], values["output_tokens"], values["cached_tokens"] = usage
            values["error_file_id"] = self._error_file(conn, batch_id, row.tenant_id, row.model,
                                                       row.output_expires_seconds)
            conn.execute(q.update_batch(batch_id, **values))
        return True

    def _error_file(self, conn, batch_id: str, tenant_id: str, model: str | None,
                    expires_after_s: int | None = None) -> str | None:
        def lines():
            for reject in self._rejects(conn, batch_id):
                yield jsonl(reject_line(batch_id, reject))
            for job in self._results(conn, batch_id, FAILED_JOB_STATUSES):
                yield jsonl(output_line(job, model))
        return self.build_file(conn, tenant_id, lines(), filename=f"{batch_id}_error.jsonl",
                               batch_id=batch_id, expires_after_s=expires_after_s)

    def _rejects(self, conn, batch_id: str, limit: int | None = None) -> Iterator[LineError]:
        last = 0
        while True:
            page = 1000 if limit is None else min(1000, limit)
            rows = conn.execute(q.batch_rejects(batch_id, last, page)).all()
            for r in rows:
                yield LineError(line=r.line, code=r.code, message=r.message, param=r.param,
                                custom_id=r.custom_id)
            if limit is not None:
                limit -= len(rows)
            if len(rows) < page or limit == 0:
                return
            last = rows[-1].line

    def _results(self, conn, batch_id: str, statuses: Sequence[str]) -> Iterator[JobInfo]:
        last = -1
        while True:
            rows = conn.execute(q.batch_jobs(batch_id, last, statuses=statuses,
                                             limit=RESULTS_PAGE)).all()
            for r in rows:
                yield job_info(r)
            if len(rows) < RESULTS_PAGE:
                return
            last = rows[-1].seq

    def batch_errors(self, batch_id: str, tenant_id: str | None,
                     limit: int = 1000) -> list[LineError]:
        """The first ``limit`` lines refused when the batch was created, by line number
        (the error file holds all of them)."""
        with self.connector.connect() as conn:
            if self._batch(conn, batch_id, tenant_id) is None:
                return []
            return list(self._rejects(conn, batch_id, limit))

    def list_batches(self, tenant_id: str, *, after: str | None = None,
                     limit: int = 20) -> list[BatchInfo]:
        """The tenant's batches, newest first; ``after`` is the last id of the previous page
        (unknown: ValueError)."""
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an int in [1, 1000], got {limit!r}")
        with self.connector.connect() as conn:
            mark = None
            if after is not None:
                ref = conn.execute(q.batch_created(after, tenant_id)).first()
                if ref is None:
                    raise ValueError(f"after={after!r} is not a batch id of this tenant")
                mark = (ref.created_at, after)
            ids = conn.execute(q.batch_ids_page(tenant_id, mark, limit)).scalars().all()
            return [self._batch(conn, batch_id, tenant_id) for batch_id in ids]

    def batch_results(self, batch_id: str, tenant_id: str | None) -> Iterator[JobInfo]:
        """Every job of the batch in input order, read in pages (constant memory)."""
        last = -1
        while True:
            with self.connector.connect() as conn:
                rows = conn.execute(q.batch_jobs(batch_id, last, tenant_id=tenant_id,
                                                 limit=RESULTS_PAGE)).all()
            for r in rows:
                yield job_info(r)
            if len(rows) < RESULTS_PAGE:
                return
            last = rows[-1].seq
