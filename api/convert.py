"""Turn the scheduler's dataclasses into API bodies (jobs, batches, OpenAI output lines)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from lorry.api.schemas import (
    AdapterOut,
    BatchOut,
    BatchUsage,
    FileOut,
    InputTokensDetails,
    JobOut,
    JobResult,
    RequestCounts,
    Usage,
)
from lorry.scheduler.batch_files import output_line as scheduler_output_line
from lorry.scheduler.batch_files import usage_of


def epoch(value) -> float | None:
    """datetime (naive = UTC) or number -> seconds since the epoch."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    return float(value)


def _int_epoch(value) -> int | None:
    e = epoch(value)
    return None if e is None else int(e)


def job_result(info) -> JobResult | None:
    result = getattr(info, "result", None)
    if result is None:
        return None
    return JobResult(text=result.text or "", token_ids=list(result.token_ids or []),
                     finish_reason=result.finish_reason,
                     logprobs=getattr(result, "logprobs", None),
                     usage=Usage(**usage_of(result)))


def job_out(info) -> JobOut:
    return JobOut(id=info.id, status=info.status, adapter=info.adapter, prompt=info.prompt,
                  messages=info.messages, sampling=dict(info.sampling or {}),
                  priority=info.priority, attempts=info.attempts,
                  batch_id=info.batch_id, custom_id=info.custom_id,
                  created_at=epoch(info.created_at), started_at=epoch(info.started_at),
                  finished_at=epoch(info.finished_at), result=job_result(info),
                  error=info.error, cancel_requested=bool(info.cancel_requested))


def adapter_out(info) -> AdapterOut:
    return AdapterOut(id=info.id, name=info.name, source=info.source, revision=info.revision,
                      rank=info.rank, status=info.status, shared=info.tenant_id is None)


def batch_out(info, line_errors: list[dict] | None = None) -> BatchOut:
    """OpenAI's Batch object; ``line_errors``: the refused lines shown under ``errors``."""
    counts = info.request_counts
    if not isinstance(counts, dict):
        counts = {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
    meta = dict(info.metadata or {})
    legacy = meta.pop("lorry_endpoint", None)
    meta.pop("lorry_rejected_lines", None)
    ts = {k: _int_epoch(getattr(info, k, None)) for k in (
        "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
        "failed_at", "expired_at", "cancelling_at", "cancelled_at")}
    out = BatchOut(id=info.id, status=info.status,
                   endpoint=getattr(info, "endpoint", None) or legacy or "/v1/chat/completions",
                   input_file_id=getattr(info, "input_file_id", None),
                   output_file_id=getattr(info, "output_file_id", None),
                   error_file_id=getattr(info, "error_file_id", None),
                   completion_window=info.completion_window,
                   request_counts=RequestCounts(**counts), metadata=meta or None,
                   model=getattr(info, "model", None), **ts)
    i, o = getattr(info, "input_tokens", None), getattr(info, "output_tokens", None)
    if i is not None and o is not None:
        cached = InputTokensDetails(cached_tokens=getattr(info, "cached_tokens", None) or 0)
        out.usage = BatchUsage(input_tokens=i, input_tokens_details=cached, output_tokens=o,
                               total_tokens=i + o)
    if line_errors:
        out.errors = {"object": "list", "data": line_errors}
    return out


def file_out(info) -> FileOut:
    return FileOut(id=info.id, bytes=info.bytes, created_at=_int_epoch(info.created_at) or 0,
                   filename=info.filename, purpose=info.purpose, status=info.status,
                   expires_at=_int_epoch(info.expires_at))


def output_line(info, model_name: str) -> dict[str, Any]:
    """One line of a batch's output/errors file, in OpenAI's shape."""
    return scheduler_output_line(info, model_name)
