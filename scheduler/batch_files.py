"""The lines of a batch's output and error files, in OpenAI's Batch shape (one per
custom_id): succeeded requests, failed/cancelled/expired ones, and refused input lines."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from lorry.scheduler.openai_logprobs import chat_logprobs, completion_logprobs
from lorry.scheduler.types import JobInfo, LineError, Result, is_adapter_failure

FAILED_CODES = {"failed": "job_failed", "cancelled": "batch_cancelled",
                "expired": "batch_expired"}


def _epoch(value) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


def usage_of(res: Result) -> dict[str, Any]:
    """A result's usage in OpenAI's completion shape (the cached tokens: prompt tokens
    served from the engine's prefix cache)."""
    prompt_tokens, completion = res.prompt_tokens or 0, res.completion_tokens or 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens or 0}}


def output_line(job: JobInfo, model_name: str | None) -> dict[str, Any]:
    """One output (succeeded) or error (anything else) line of a batch job."""
    short = job.id.removeprefix("job_")
    res = job.result
    if job.status != "succeeded" or res is None:
        code = "adapter_unloadable" if job.status == "failed" and is_adapter_failure(
            job.error) else FAILED_CODES.get(job.status, job.status)
        message = job.error or f"the request ended with status {job.status!r}"
        return {"id": f"batch_req_{short}", "custom_id": job.custom_id, "response": None,
                "error": {"code": code, "message": message}}
    usage = usage_of(res)
    created = _epoch(job.finished_at) if isinstance(job.finished_at, datetime) \
        else int(time.time())
    if job.messages is not None:
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text or ""},
                  "logprobs": chat_logprobs(res.logprobs), "finish_reason": res.finish_reason}
        body = {"id": f"chatcmpl-{short}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": res.text or "",
                  "logprobs": completion_logprobs(res.logprobs),
                  "finish_reason": res.finish_reason}
        body = {"id": f"cmpl-{short}", "object": "text_completion"}
    body.update(created=created, model=job.adapter or model_name, choices=[choice],
                usage=usage, system_fingerprint=None)   # as the synchronous answer's
    return {"id": f"batch_req_{short}", "custom_id": job.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{short}", "body": body},
            "error": None}


def reject_line(batch_id: str, reject: LineError) -> dict[str, Any]:
    """The error-file line of an input line refused when the batch was created."""
    return {"id": f"batch_req_{batch_id.removeprefix('batch_')}_line{reject.line}",
            "custom_id": reject.custom_id, "response": None,
            "error": {"code": reject.code, "message": reject.message, "param": reject.param,
                      "line": reject.line}}


def jsonl(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
