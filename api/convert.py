"""Turn the scheduler's dataclasses into API bodies (jobs, batches, OpenAI output lines)."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from lorry.api.schemas import AdapterOut, BatchOut, JobOut, JobResult, RequestCounts, Usage


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
    prompt_tokens = getattr(result, "prompt_tokens", 0) or 0
    completion = getattr(result, "completion_tokens", 0) or 0
    return JobResult(text=result.text or "", token_ids=list(result.token_ids or []),
                     finish_reason=result.finish_reason,
                     usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                 total_tokens=prompt_tokens + completion))


def job_out(info) -> JobOut:
    return JobOut(id=info.id, status=info.status, adapter=info.adapter, prompt=info.prompt,
                  messages=info.messages, sampling=dict(info.sampling or {}),
                  priority=info.priority, attempts=info.attempts,
                  batch_id=info.batch_id, custom_id=info.custom_id,
                  created_at=epoch(info.created_at), started_at=epoch(info.started_at),
                  finished_at=epoch(info.finished_at), result=job_result(info),
                  error=info.error)


def adapter_out(info) -> AdapterOut:
    return AdapterOut(id=info.id, name=info.name, source=info.source, revision=info.revision,
                      rank=info.rank, status=info.status, shared=info.tenant_id is None)


def batch_out(info, line_errors: list[dict] | None = None) -> BatchOut:
    counts = info.request_counts
    if not isinstance(counts, dict):
        counts = {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
    meta = dict(info.metadata or {})
    endpoint = meta.pop("lorry_endpoint", "/v1/chat/completions")
    out = BatchOut(id=info.id, status=info.status, endpoint=endpoint,
                   completion_window=info.completion_window,
                   created_at=_int_epoch(info.created_at),
                   in_progress_at=_int_epoch(getattr(info, "in_progress_at", None)),
                   expires_at=_int_epoch(getattr(info, "expires_at", None)),
                   completed_at=_int_epoch(getattr(info, "completed_at", None)),
                   failed_at=_int_epoch(getattr(info, "failed_at", None)),
                   expired_at=_int_epoch(getattr(info, "expired_at", None)),
                   cancelled_at=_int_epoch(getattr(info, "cancelled_at", None)),
                   request_counts=RequestCounts(**counts), metadata=meta or None)
    if info.status in ("completed", "cancelled", "expired", "failed"):
        out.output_file_id = f"{info.id}/output"
        out.error_file_id = f"{info.id}/errors"
    if line_errors:
        out.errors = {"object": "list", "data": line_errors}
    return out


def output_line(info, model_name: str) -> dict[str, Any]:
    """One line of a batch's output/errors file, in OpenAI's shape."""
    request_id = f"req_{info.id.removeprefix('job_')}"
    chat = info.messages is not None
    res = job_result(info)
    if info.status != "succeeded" or res is None:
        code = {"failed": "job_failed", "cancelled": "cancelled", "expired": "expired"}.get(
            info.status, info.status)
        message = info.error or f"the request ended with status {info.status!r}"
        return {"id": f"batch_req_{info.id.removeprefix('job_')}", "custom_id": info.custom_id,
                "response": None, "error": {"code": code, "message": message}}
    created = int(epoch(info.finished_at) or time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                  "logprobs": None, "finish_reason": res.finish_reason}
        body = {"id": f"chatcmpl-{info.id.removeprefix('job_')}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": res.text, "logprobs": None,
                  "finish_reason": res.finish_reason}
        body = {"id": f"cmpl-{info.id.removeprefix('job_')}", "object": "text_completion"}
    body.update(created=created, model=info.adapter or model_name, choices=[choice],
                usage=res.usage.model_dump())
    return {"id": f"batch_req_{info.id.removeprefix('job_')}", "custom_id": info.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}
