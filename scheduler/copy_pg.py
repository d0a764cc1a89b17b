"""New job rows, and their bulk insert through PostgreSQL's COPY (text lines built straight
from the specs: the per-field formatting was most of an enqueue's time)."""
from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import datetime
from typing import NamedTuple

from lorry.scheduler import queries
from lorry.scheduler.types import JobSpec

_SMALL = [str(i) for i in range(256)]
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class NewJob(NamedTuple):
    """A job to insert: the spec and what the submit decided for it."""

    id: str
    tenant_id: str
    adapter_id: int          # 0 = base model
    spec: JobSpec
    deadline: datetime | None  # naive UTC, capped by the batch's window
    seq: int                 # position in its submit / batch file
    now: datetime            # created_at = enqueued_at
    batch_id: str | None

    def as_row(self) -> dict:
        s = self.spec
        return dict(id=self.id, tenant_id=self.tenant_id, adapter_id=self.adapter_id,
                    adapter_name=s.adapter, prompt=s.prompt, messages=s.messages,
                    sampling=s.sampling, priority=s.priority, status="queued", attempts=0,
                    max_attempts=s.max_attempts, enqueued_at=self.now, not_before=None,
                    deadline=self.deadline, cancel_requested=False, created_at=self.now,
                    batch_id=self.batch_id, seq=self.seq, custom_id=s.custom_id,
                    idempotency_key=s.idempotency_key)


def _text(value: str | None) -> str:
    """A text field in COPY's text format (None: NULL)."""
    return "\\N" if value is None else value.translate(_ESCAPES)


OPTIONAL = ("prompt", "messages", "custom_id", "idempotency_key", "deadline", "batch_id")
_COLUMNS = ("id", "tenant_id", "adapter_id", "adapter_name", "sampling", "priority",
            "max_attempts", "seq", "enqueued_at", "created_at")
_CONSTANT = ("status", "attempts", "cancel_requested")  # written once per line as a suffix


def _copy_sql(optional: tuple[str, ...]) -> str:
    # The columns in the order _lines writes each line's fields.
    return queries.copy_jobs(_COLUMNS + optional + _CONSTANT)


def copy_jobs(conn, rows: list[NewJob]) -> None:
    """Bulk insert through PostgreSQL's COPY (text format), in the caller's transaction.

    Optional columns that are NULL in every row are left out (they default to NULL).
    """
    specs = [r.spec for r in rows]
    present = {"prompt": any(s.prompt is not None for s in specs),
               "messages": any(s.messages is not None for s in specs),
               "custom_id": any(s.custom_id is not None for s in specs),
               "idempotency_key": any(s.idempotency_key is not None for s in specs),
               "deadline": any(r.deadline is not None for r in rows),
               "batch_id": any(r.batch_id is not None for r in rows)}
    optional = tuple(c for c in OPTIONAL if present[c])
    memo = _Memo()
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(_copy_sql(optional)) as copy:
        for start in range(0, len(rows), 1000):
            # Sent chunk by chunk: the server parses one while the next one is formatted.
            copy.write(_lines(rows[start:start + 1000], optional, memo))


class JobCopy:
    """One COPY into jobs (every column) kept open across writes, in the caller's
    transaction: PostgreSQL stores the rows written so far while the caller prepares the
    next ones. ``pause`` ends it so that other statements can run on the connection (the
    next write starts another); ``close`` ends it for good."""

    def __init__(self, conn):
        self._raw = conn.connection.driver_connection
        self._stack: ExitStack | None = None
        self._copy = None
        self._memo = _Memo()

    def write(self, rows: list[NewJob], encoded: dict[int, str] | None = None) -> None:
        """Send rows; ``encoded``: id(messages list) -> its JSON, when already encoded."""
        if self._copy is None:
            self._stack = ExitStack()
            cur = self._stack.enter_context(self._raw.cursor())
            self._copy = self._stack.enter_context(cur.copy(_copy_sql(OPTIONAL)))
        self._memo.samplings.clear()  # keyed by id(): only the dicts of this write are alive
        for start in range(0, len(rows), 1000):
            self._copy.write(_lines(rows[start:start + 1000], OPTIONAL, self._memo, encoded))

    def pause(self) -> None:
        """End the COPY (waits for PostgreSQL to have stored every row written)."""
        if self._stack is not None:
            stack, self._stack, self._copy = self._stack, None, None
            stack.close()

    def close(self, error: BaseException | None = None) -> None:
        """End the COPY; with ``error``, abandon it (the transaction is rolled back)."""
        if self._stack is None:
            return
        stack, self._stack, self._copy = self._stack, None, None
        if error is None:
            stack.close()
        else:
            stack.__exit__(type(error), error, error.__traceback__)


class _Memo:
    """Fields formatted once: adapter name -> field; id(sampling dict) -> field (specs often
    share one); (tenant, now) -> (tenant field, both time fields); batch id -> field."""

    def __init__(self):
        self.names: dict = {}
        self.samplings: dict = {}
        self.contexts: dict = {}
        self.batches: dict = {}


def _lines(rows, optional: tuple[str, ...], memo: _Memo,
           encoded: dict[int, str] | None = None) -> str:
    """COPY text lines of rows, with the optional columns given (in OPTIONAL's order)."""
    has_prompt, has_messages, has_custom, has_key, has_deadline, has_batch = (
        c in optional for c in OPTIONAL)
    names, samplings, contexts, batches = memo.names, memo.samplings, memo.contexts, \
        memo.batches
    encoded = encoded or {}
    small = _SMALL
    dumps = json.dumps
    suffix = "\tqueued\t0\tf\n"
    out = []
    for r in rows:
        s = r.spec
        name = names.get(s.adapter)
        if name is None:
            name = names[s.adapter] = _text(s.adapter)
        sampling = samplings.get(id(s.sampling))
        if sampling is None:
            sampling = samplings[id(s.sampling)] = _text(dumps(s.sampling))
        ctx = contexts.get((r.tenant_id, r.now))
        if ctx is None:
            stamp = r.now.isoformat(" ")
            ctx = contexts[(r.tenant_id, r.now)] = (_text(r.tenant_id), f"{stamp}\t{stamp}")
        p, m, seq = s.priority, s.max_attempts, r.seq
        line = (f"{r.id}\t{ctx[0]}\t{r.adapter_id}\t{name}\t{sampling}\t"
                f"{small[p] if 0 <= p < 256 else p}\t{small[m] if 0 <= m < 256 else m}\t"
                f"{seq}\t{ctx[1]}")
        if has_prompt:
            line += "\t" + _text(s.prompt)
        if has_messages:
            messages = s.messages
            line += "\t" + ("\\N" if messages is None else _text(
                encoded.get(id(messages)) or dumps(messages)))
        if has_custom:
            line += "\t" + _text(s.custom_id)
        if has_key:
            line += "\t" + _text(s.idempotency_key)
        if has_deadline:
            line += "\t" + ("\\N" if r.deadline is None else r.deadline.isoformat(" "))
        if has_batch:
            batch = batches.get(r.batch_id)
            if batch is None:
                batch = batches[r.batch_id] = _text(r.batch_id)
            line += "\t" + batch
        out.append(line + suffix)
    return "".join(out)
