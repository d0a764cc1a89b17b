"""Jobs: submit one, read it, list them (filters, cursor pagination), cancel."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from fastapi import APIRouter, Depends, Query, Request, Response

from lorry.api.convert import job_out
from lorry.api.deps import get_queue, get_settings, get_tenant, nudge
from lorry.api.errors import ApiError, responses
from lorry.api.prompt_length import check_prompt_length
from lorry.api.schemas import ID_PATTERN, NAME_PATTERN, JobCreate, JobOut, JobPage, is_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
PAGE_BYTES = 4 * 1024 * 1024  # a list page ends once its jobs pass this (one job at least)
FETCH_ROWS = 50  # jobs read from the database at a time while a page is written


def check_adapter(queue, tenant, name: str | None) -> None:
    """422 naming the adapter when the tenant cannot use it (unknown or another tenant's)."""
    if name is None or queue.get_adapter(name, tenant.id) is not None:
        return
    known = sorted(a.name for a in queue.list_adapters(tenant.id))
    raise ApiError(422, f"unknown adapter {name!r}; adapters you can use: {known} "
                        "(or null for the base model)", code="unknown_adapter", param="adapter")


def spec_of(body: JobCreate):
    from lorry.scheduler import JobSpec

    deadline = None
    if body.deadline_seconds is not None:
        deadline = datetime.now(timezone.utc) + timedelta(seconds=body.deadline_seconds)
    return JobSpec(adapter=body.adapter, prompt=body.prompt,
                   messages=[m.model_dump() for m in body.messages] if body.messages else None,
                   sampling=body.sampling.model_dump(exclude_none=True),
                   priority=body.priority, max_attempts=body.max_attempts, deadline=deadline,
                   idempotency_key=body.idempotency_key)


@router.post("", response_model=JobOut, status_code=201, summary="Submit a generation job",
             responses={**responses(413, 429), 200: {
                 "model": JobOut, "description": "the job an earlier submit with this "
                 "idempotency_key queued (nothing new is queued)"}})
def submit_job(body: JobCreate, request: Request, response: Response,
               tenant=Depends(get_tenant), queue=Depends(get_queue),
               settings=Depends(get_settings)):
    check_adapter(queue, tenant, body.adapter)
    check_prompt_length(settings, body.prompt,
                        [m.content for m in body.messages] if body.messages else None,
                        body.sampling.max_tokens if "max_tokens" in body.sampling.model_fields_set
                        else None, "sampling.max_tokens")
    [info] = queue.submit(tenant.id, [spec_of(body)])
    if info.replayed:  # as files and batches answer a repeat
        response.status_code = 200
    else:
        nudge(request, 1)
    return job_out(info)


@router.get("", response_model=JobPage, summary="List your jobs, oldest first")
def list_jobs(status: str | None = Query(None, pattern="^(" + "|".join(STATUSES) + ")$"),
              adapter: str | None = Query(None, pattern=NAME_PATTERN),
              batch_id: str | None = Query(None, max_length=64, pattern=ID_PATTERN),
              limit: int = Query(100, ge=1, le=500),
              after: str | None = Query(None, max_length=64, pattern=ID_PATTERN,
                                        description="next_cursor of the previous page"),
              tenant=Depends(get_tenant), queue=Depends(get_queue)):
    """Up to `limit` jobs; fewer when they pass 4 MiB of JSON: follow `next_cursor` while
    `has_more`."""
    # Read FETCH_ROWS at a time and written out one by one: a page of 500 jobs with
    # 128,000-character prompts was 72 MB built in memory at once.
    parts: list[bytes] = []
    size, cursor = 0, after
    while True:
        want = min(FETCH_ROWS, limit - len(parts))
        try:
            rows = queue.list_jobs(tenant.id, status=status, adapter=adapter,
                                   batch_id=batch_id, limit=want + 1, after=cursor)
        except ValueError as e:  # an `after` cursor that is not one of the tenant's jobs
            raise ApiError(422, str(e), code="invalid_cursor", param="after") from None
        taken = 0
        for row in rows[:want]:
            if parts and size >= PAGE_BYTES:
                break
            text = job_out(row).model_dump_json().encode()  # bytes: non-ASCII is not escaped
            parts.append(text)
            size += len(text)
            cursor, taken = row.id, taken + 1
        has_more = taken < len(rows)  # a row of this read is left for the next
        if not has_more or len(parts) >= limit or size >= PAGE_BYTES:
            break
    body = (b'{"object":"list","data":[' + b",".join(parts) + b'],"has_more":'
            + (b"true" if has_more else b"false") + b',"next_cursor":'
            + (json.dumps(cursor) if has_more and parts else "null").encode() + b"}")
    return Response(body, media_type="application/json")


def _no_job(job_id: str) -> ApiError:
    return ApiError(404, f"no job {job_id!r}", code="job_not_found", param="job_id")


@router.get("/{job_id}", response_model=JobOut, summary="Get a job and its result",
            responses=responses(404))
def get_job(job_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    info = queue.get_job(job_id, tenant_id=tenant.id) if is_id(job_id) else None
    if info is None:
        raise _no_job(job_id)
    return job_out(info)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=responses(404),
             summary="Cancel a job (queued: now; running: within about a second)")
def cancel_job(job_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    info = queue.cancel(job_id, tenant.id) if is_id(job_id) else None
    if info is None:
        raise _no_job(job_id)
    return job_out(info)
