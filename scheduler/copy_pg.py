"""New job rows, and their bulk insert through PostgreSQL's COPY (text lines built straight
from the specs: the per-field formatting was most of an enqueue's time)."""
from __future__ import annotations

import json
from datetime import datetime
from typing import NamedTuple

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


def copy_jobs(conn, rows: list[NewJob]) -> None:
    """Bulk insert through PostgreSQL's COPY (text format), in the caller's transaction.

    Optional columns that are NULL in every row are left out (they default to NULL); the
    constant ones (status, attempts, cancel_requested) are written once per line as a suffix.
    """
    specs = [r.spec for r in rows]
    has_prompt = any(s.prompt is not None for s in specs)
    has_messages = any(s.messages is not None for s in specs)
    has_custom = any(s.custom_id is not None for s in specs)
    has_key = any(s.idempotency_key is not None for s in specs)
    has_deadline = any(r.deadline is not None for r in rows)
    has_batch = any(r.batch_id is not None for r in rows)
    cols = ["id", "tenant_id", "adapter_id", "adapter_name", "sampling", "priority",
            "max_attempts", "seq", "enqueued_at", "created_at"]
    cols += [c for c, on in (("prompt", has_prompt), ("messages", has_messages),
                             ("custom_id", has_custom), ("idempotency_key", has_key),
                             ("deadline", has_deadline), ("batch_id", has_batch)) if on]
    cols += ["status", "attempts", "cancel_requested"]

    # adapter name -> field; id(sampling dict) -> field (specs often share one dict);
    # (tenant, now) -> (tenant field, "now\tnow"): per submit.
    memo: tuple[dict, dict, dict] = ({}, {}, {})
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY jobs ({', '.join(cols)}) FROM STDIN") as copy:
        for start in range(0, len(rows), 1000):
            # Sent chunk by chunk: the server parses one while the next one is formatted.
            copy.write("".join(_lines(rows[start:start + 1000], has_prompt, has_messages,
                                      has_custom, has_key, has_deadline, has_batch, memo)))


def _lines(rows, has_prompt, has_messages, has_custom, has_key, has_deadline, has_batch,
           memo):
    """COPY text lines of rows, with the optional columns copy_jobs chose."""
    names, samplings, contexts = memo
    small = _SMALL
    dumps = json.dumps
    suffix = "\tqueued\t0\tf\n"
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
            line += "\t" + ("\\N" if s.messages is None else _text(dumps(s.messages)))
        if has_custom:
            line += "\t" + _text(s.custom_id)
        if has_key:
            line += "\t" + _text(s.idempotency_key)
        if has_deadline:
            line += "\t" + ("\\N" if r.deadline is None else r.deadline.isoformat(" "))
        if has_batch:
            line += "\t" + _text(r.batch_id)
        yield line + suffix
