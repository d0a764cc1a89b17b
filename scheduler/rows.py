"""Row -> dataclass conversions, by column name (no ORM object leaves the gateway)."""
from __future__ import annotations

from lorry.scheduler.types import AdapterInfo, BatchInfo, FileInfo, JobInfo, Result, TenantInfo


def tenant_info(r) -> TenantInfo:
    return TenantInfo(id=r.id, name=r.name, weight=r.weight, max_queued=r.max_queued,
                      created_at=r.created_at)


def adapter_info(r) -> AdapterInfo:
    return AdapterInfo(id=r.id, name=r.name, source=r.source, revision=r.revision,
                       tenant_id=r.tenant_id, rank=r.rank, status=r.status,
                       base_model=r.base_model, created_at=r.created_at)


def job_info(r) -> JobInfo:
    result = None
    if r.finish_reason is not None or r.result_text is not None:
        result = Result(text=r.result_text or "", token_ids=list(r.result_token_ids or []),
                        finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens or 0,
                        completion_tokens=r.completion_tokens or 0,
                        cached_tokens=r.cached_tokens or 0, timings=dict(r.timings or {}),
                        logprobs=r.result_logprobs)
    return JobInfo(id=r.id, tenant_id=r.tenant_id, adapter=r.adapter_name, status=r.status,
                   prompt=r.prompt, messages=r.messages, sampling=dict(r.sampling or {}),
                   priority=r.priority, attempts=r.attempts, max_attempts=r.max_attempts,
                   created_at=r.created_at, started_at=r.started_at, finished_at=r.finished_at,
                   deadline=r.deadline, not_before=r.not_before, batch_id=r.batch_id,
                   custom_id=r.custom_id, idempotency_key=r.idempotency_key,
                   worker_id=r.worker_id, cancel_requested=bool(r.cancel_requested),
                   error=r.error, result=result)


def batch_info(r, counts: dict[str, int]) -> BatchInfo:
    return BatchInfo(id=r.id, tenant_id=r.tenant_id, status=r.status,
                     completion_window=r.completion_window, request_counts=counts,
                     metadata=r.metadata_ if hasattr(r, "metadata_") else r.metadata,
                     created_at=r.created_at, expires_at=r.expires_at,
                     in_progress_at=r.in_progress_at, finalizing_at=r.finalizing_at,
                     completed_at=r.completed_at, failed_at=r.failed_at,
                     expired_at=r.expired_at, cancelling_at=r.cancelling_at,
                     cancelled_at=r.cancelled_at, endpoint=r.endpoint,
                     input_file_id=r.input_file_id, output_file_id=r.output_file_id,
                     error_file_id=r.error_file_id, rejected=r.rejected or 0,
                     idempotency_key=r.idempotency_key, model=r.model,
                     input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                     cached_tokens=r.cached_tokens)


def file_info(r) -> FileInfo:
    return FileInfo(id=r.id, tenant_id=r.tenant_id, purpose=r.purpose, filename=r.filename,
                    bytes=r.bytes, lines=r.lines, status=r.status, created_at=r.created_at,
                    batch_id=r.batch_id, idempotency_key=r.idempotency_key,
                    expires_at=r.expires_at)
