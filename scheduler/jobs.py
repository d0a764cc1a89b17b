"""Submitting, reading, listing and cancelling jobs (JobQueue mixin)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime

from lorry.scheduler import errors
from lorry.scheduler import queries as q
from lorry.scheduler.copy_pg import NewJob, copy_jobs
from lorry.scheduler.db import add_to_groups, naive_utc
from lorry.scheduler.rows import job_info
from lorry.scheduler.types import JobInfo, JobSpec

COPY_MIN_ROWS = 64  # from here on COPY beats multi-row INSERT on PostgreSQL


def validate_spec(spec: JobSpec, index: int, checked: set[int] | None = None,
                  encoded: dict[int, str] | None = None) -> None:
    """Raise InvalidJob naming what is wrong with spec (job #index). ``checked``: ids of
    sampling dicts already found storable (specs of one batch often share one);
    ``encoded`` gets id(spec.messages) -> their JSON (the check encodes them anyway)."""
    where = f"job #{index}"
    if not isinstance(spec, JobSpec):
        raise errors.InvalidJob(f"{where}: expected a JobSpec, got {type(spec).__name__}")
    if (spec.prompt is None) == (spec.messages is None):
        raise errors.InvalidJob(f"{where}: give exactly one of prompt or messages "
                                f"(prompt={spec.prompt!r:.40}, messages={spec.messages!r:.40})")
    if spec.messages is not None and not (isinstance(spec.messages, list) and spec.messages
                                          and all(isinstance(m, dict) for m in spec.messages)):
        raise errors.InvalidJob(f"{where}: messages must be a non-empty list of dicts")
    if not isinstance(spec.sampling, dict):
        raise errors.InvalidJob(f"{where}: sampling must be a dict, got {spec.sampling!r}")
    if not isinstance(spec.priority, int) or not -1000 <= spec.priority <= 1000:
        raise errors.InvalidJob(f"{where}: priority must be an int in [-1000, 1000], "
                                f"got {spec.priority!r}")
    if not isinstance(spec.max_attempts, int) or not 1 <= spec.max_attempts <= 100:
        raise errors.InvalidJob(f"{where}: max_attempts must be an int in [1, 100], "
                                f"got {spec.max_attempts!r}")
    if spec.deadline is not None and not isinstance(spec.deadline, datetime):
        raise errors.InvalidJob(f"{where}: deadline must be a datetime, got {spec.deadline!r}")
    shared = checked is not None and id(spec.sampling) in checked
    for field in ("prompt", "messages", "custom_id", "idempotency_key") if shared else (
            "prompt", "messages", "sampling", "custom_id", "idempotency_key"):
        value = getattr(spec, field, None)
        problem = unstorable(value, encoded if field == "messages" else None)
        if problem:  # PostgreSQL text/jsonb cannot store it; JSON cannot carry it back
            raise errors.InvalidJob(f"{where}: {field} contains {problem}, which the job "
                                    "table cannot store; remove it")
    if checked is not None:
        checked.add(id(spec.sampling))


def unstorable(value, encoded: dict[int, str] | None = None) -> str | None:
    """What in value the job table cannot store and return: a NUL character, a lone UTF-16
    surrogate (not Unicode text), a NaN or infinite number (not JSON). ``encoded`` gets
    id(value) -> value's JSON when a storable dict or list was encoded to check it."""
    if isinstance(value, (dict, list)):
        # One JSON encoding checks a whole structure at C speed; only a suspect one (or one
        # json cannot encode) is walked value by value below.
        try:
            text = _dumps(value)
        except (TypeError, ValueError):
            return _unstorable(value)
        if "\\u0000" not in text and (text.isascii() or _is_utf8(text)):
            if encoded is not None:
                encoded[id(value)] = text
            return None
    return _unstorable(value)


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unstorable(value) -> str | None:
    if isinstance(value, str):
        if "\x00" in value:
            return "a NUL character (\\x00)"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"a lone UTF-16 surrogate (\\u{ord(value[e.start]):04x})"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"the number {value!r}"
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return None
    for item in items:
        problem = _unstorable(item)
        if problem:
            return problem
    return None


def new_rows(tenant_id: str, specs: list[JobSpec], adapters: dict, existing: dict[str, JobInfo],
             rows: list[NewJob], now: datetime, batch_id: str | None,
             deadline_cap: datetime | None, seq_start: int,
             infos: bool = True) -> list[JobInfo] | None:
    """The new rows of specs (adapter ids resolved), appended to rows; the JobInfos (None
    when ``infos`` is False: a batch's ingest reads none). A spec whose idempotency key is in
    ``existing`` (or earlier in specs) gets that job instead of a row."""
    # Ids start with the time (ms, 12 hex digits): new keys land at the right edge of the
    # primary key's B-tree instead of all over it (fewer pages dirtied at 1M jobs); then 80
    # random bits (one urandom call for the whole submit).
    stamp = f"job_{int(time.time() * 1000) & 0xFFFFFFFFFFFF:012x}"
    noise = os.urandom(10 * len(specs)).hex()
    out: list[JobInfo] = []
    by_key: dict[str, JobInfo | None] = {}
    for seq, s in enumerate(specs):
        key = s.idempotency_key
        if key is not None:
            if key in existing:
                out.append(dataclasses.replace(existing[key], replayed=True))
                continue
            if key in by_key:
                out.append(by_key[key])  # the same key twice in one request
                continue
        deadline = s.deadline
        if deadline is not None and deadline.tzinfo is not None:
            deadline = naive_utc(deadline)
        if deadline_cap is not None and (deadline is None or deadline > deadline_cap):
            deadline = deadline_cap
        job_id = stamp + noise[20 * seq:20 * seq + 20]
        rows.append(NewJob(job_id, tenant_id, adapters[s.adapter], s, deadline,
                           seq_start + seq, now, batch_id))
        info = None
        if infos or key is not None:
            info = JobInfo(job_id, tenant_id, s.adapter, "queued", s.prompt, s.messages,
                           s.sampling, s.priority, 0, s.max_attempts, now, deadline=deadline,
                           batch_id=batch_id, custom_id=s.custom_id, idempotency_key=key)
            out.append(info)
        if key is not None:
            by_key[key] = info
    return out if infos else None


def group_deltas(rows: list[NewJob], deltas: dict) -> dict:
    """deltas += the queue_groups changes of new rows: (tenant, adapter id, priority) ->
    (count, oldest enqueued_at)."""
    for r in rows:
        key = (r.tenant_id, r.adapter_id, r.spec.priority)
        n, oldest = deltas.get(key, (0, r.now))
        deltas[key] = (n + 1, oldest if oldest <= r.now else r.now)
    return deltas


class JobOps:
    def submit(self, tenant_id: str, specs: JobSpec | Sequence[JobSpec]) -> list[JobInfo]:
        """Queue one or many jobs in one transaction; a known idempotency key returns the
        existing job instead. Raises InvalidJob, UnknownAdapter, QuotaExceeded (nothing queued)."""
        specs = [specs] if isinstance(specs, JobSpec) else list(specs)
        return self.submit_many({tenant_id: specs})[tenant_id]

    def submit_many(self, by_tenant: Mapping[str, Sequence[JobSpec]]) -> dict[str, list[JobInfo]]:
        """Queue the jobs of several tenants in one transaction (one COPY on PostgreSQL), as
        submit() would for each tenant; all or nothing. Returns each tenant's JobInfos."""
        by_tenant = {t: list(v) for t, v in by_tenant.items()}
        for specs in by_tenant.values():
            for i, spec in enumerate(specs):
                validate_spec(spec, i)
        for attempt in (0, 1):
            try:
                with self.connector.begin() as conn:
                    # One look-up of all tenants and of all named adapters, not one per tenant.
                    known = {r.id: r for r in conn.execute(q.tenants(list(by_tenant)))}
                    found = self._adapter_rows(conn, list(by_tenant), {
                        s.adapter for specs in by_tenant.values() for s in specs})
                    rows, out = [], {}
                    # in one order, so that two such submits take the tenants' quota locks
                    # in the same order (no deadlock)
                    for tenant_id, specs in sorted(by_tenant.items()):
                        out[tenant_id] = self._prepare(conn, tenant_id, specs, rows,
                                                       tenant=known.get(tenant_id, False),
                                                       adapter_rows=found)
                    self._write(conn, rows)
                    return out
            except errors.DuplicateKey:
                # A concurrent submit with the same idempotency key won: return its job.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _submit(self, conn, tenant_id: str, specs: list[JobSpec]) -> list[JobInfo]:
        """submit() in the caller's transaction."""
        rows: list[NewJob] = []
        out = self._prepare(conn, tenant_id, specs, rows)
        self._write(conn, rows)
        return out

    def _prepare(self, conn, tenant_id: str, specs: list[JobSpec], rows: list[NewJob],
                 tenant=None, adapter_rows: dict | None = None) -> list[JobInfo]:
        """Checks (tenant, adapters, quota) and the new rows, appended to rows; the JobInfos.
        tenant (False: known missing) and adapter_rows may come from a caller's look-up.
        (A batch's rows go through batch_writer.BatchWriter.)"""
        first = len(rows)
        if tenant is None:
            tenant = conn.execute(q.tenant(tenant_id)).first()
        if not tenant:
            raise errors.UnknownTenant(f"tenant {tenant_id!r} does not exist")
        names = {s.adapter for s in specs}
        if adapter_rows is None:
            adapter_rows = self._adapter_rows(conn, [tenant_id], names)
        adapters = self._resolve_adapters(tenant_id, names, adapter_rows)
        out = new_rows(tenant_id, specs, adapters, self._known_keys(conn, tenant_id, specs),
                       rows, self.now(), None, None, 0)
        added = len(rows) - first
        if tenant.max_queued is not None and added:
            queued = self._queued(conn, tenant_id)
            if queued + added > tenant.max_queued:
                raise errors.QuotaExceeded(tenant_id, queued, added, tenant.max_queued)
        return out

    def _known_keys(self, conn, tenant_id: str, specs: list[JobSpec]) -> dict[str, JobInfo]:
        """The tenant's jobs already holding one of the specs' idempotency keys, by key."""
        keys = {s.idempotency_key for s in specs if s.idempotency_key is not None}
        if not keys:
            return {}
        return {r.idempotency_key: job_info(r) for r in conn.execute(
            q.jobs_by_keys(tenant_id, keys))}

    def _queued(self, conn, tenant_id: str, lock: bool = True) -> int:
        """The tenant's queued jobs, for its quota: on PostgreSQL after taking the tenant's
        quota lock (``lock``), so that a concurrent submit counts this transaction's rows (it
        waits for its commit) instead of the same count as this one."""
        if lock and conn.dialect.name == "postgresql":
            conn.execute(q.quota_lock(tenant_id))
        return conn.execute(q.queued_jobs(tenant_id)).scalar_one()

    def _write(self, conn, rows: list[NewJob]) -> None:
        if not rows:
            return
        if conn.dialect.name == "postgresql" and len(rows) >= COPY_MIN_ROWS:
            copy_jobs(conn, rows)
        else:
            conn.execute(q.INSERT_JOBS, [r.as_row() for r in rows])  # multi-row INSERTs
        add_to_groups(conn, group_deltas(rows, {}))

    def _adapter_rows(self, conn, tenant_ids: list, names: set) -> dict:
        """{tenant_key: {name: row}} of the named adapters owned by these tenants or shared
        (tenant_key "")."""
        wanted = {n for n in names if n is not None}
        out: dict[str, dict] = {}
        if wanted:
            for r in conn.execute(q.adapter_refs(wanted, list(tenant_ids) + [""])):
                out.setdefault(r.tenant_key, {})[r.name] = r
        return out

    def _resolve_adapters(self, tenant_id: str, names: set, adapter_rows: dict) -> dict:
        found: dict = {None: 0}
        wanted = {n for n in names if n is not None}
        own, shared = adapter_rows.get(tenant_id, {}), adapter_rows.get("", {})
        for name in wanted:  # the tenant's own ready adapter wins over a shared one
            r = own.get(name)
            if r is None or r.status != "ready":
                r = shared.get(name)
            if r is not None and r.status == "ready":
                found[name] = r.id
        missing = sorted(wanted - set(found))
        if missing:
            raise errors.UnknownAdapter(
                f"adapter(s) {missing} not found (or not ready) for tenant {tenant_id!r}; "
                "register them first or use adapter=None for the base model")
        return found

    def get_job(self, job_id: str, tenant_id: str | None = None) -> JobInfo | None:
        """The job, or None when unknown (or owned by another tenant than tenant_id)."""
        with self.connector.connect() as conn:
            row = conn.execute(q.job(job_id, tenant_id)).first()
        return None if row is None else job_info(row)

    def list_jobs(self, tenant_id: str, status: str | None = None, adapter: str | None = None,
                  batch_id: str | None = None, limit: int = 100,
                  after: str | None = None) -> list[JobInfo]:
        """The tenant's jobs, oldest first; `after` is the last id of the previous page."""
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an int in [1, 1000], got {limit!r}")
        with self.connector.connect() as conn:
            mark = None
            if after is not None:
                ref = conn.execute(q.job_position(after, tenant_id)).first()
                if ref is None:
                    raise ValueError(f"after={after!r} is not a job id of this tenant")
                mark = (ref.created_at, ref.seq, after)
            rows = conn.execute(q.jobs_page(tenant_id, status=status, adapter=adapter,
                                            batch_id=batch_id, after=mark, limit=limit)).all()
        return [job_info(r) for r in rows]

    def cancel(self, job_id: str, tenant_id: str | None) -> JobInfo | None:
        """Queued: cancelled now. Running: cancel_requested (the worker's cancel poll learns it
        and completes the job with cancelled=True; released, it ends cancelled). Terminal:
        unchanged. None: not found."""
        with self.connector.begin() as conn:
            row = conn.execute(q.job_for_update(job_id, tenant_id)).first()
            if row is None:
                return None
            if row.status == "queued":
                conn.execute(q.cancel_queued_job(job_id, self.now()))
                add_to_groups(conn, {(row.tenant_id, row.adapter_id, row.priority):
                                     (-1, row.enqueued_at)})
            elif row.status == "running":
                conn.execute(q.request_cancel(job_id))
            row = conn.execute(q.job(job_id)).first()
        return job_info(row)

    def queue_depth(self) -> list[tuple[str, str | None, str, int]]:
        """(status, adapter name, tenant id, count) for queued and running jobs (cheap: from
        the summary table and the running-jobs index; terminal counts are left to counters)."""
        with self.connector.connect() as conn:
            queued = conn.execute(q.QUEUED_BY_ADAPTER).all()
            names = {r.id: r.name for r in conn.execute(q.ADAPTER_NAMES)}
            running = conn.execute(q.RUNNING_BY_ADAPTER).all()
        out = [("queued", names.get(r.adapter_id) if r.adapter_id else None, r.tenant_id,
                int(r.n)) for r in queued]
        out += [("running", r.adapter_name, r.tenant_id, int(r.n)) for r in running]
        return out
