"""Batches: create one from an uploaded file (OpenAI's SDK flow) or from a JSONL body in one
step, read, list and cancel them, download output/errors."""
from __future__ import annotations

import json
import tempfile

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from lorry.api.batch_input import (
    DuplicateCustomId,
    IngestStats,
    base_model_name,
    ingest_chunks,
    line_error_dict,
)
from lorry.api.body_guard import is_json
from lorry.api.convert import batch_out, output_line
from lorry.api.deps import get_queue, get_settings, get_tenant, nudge
from lorry.api.errors import NO_RETRY, ApiError, responses
from lorry.api.json_check import check_json
from lorry.api.routes.files import IDEMPOTENCY_KEY, no_file
from lorry.api.schemas import (
    METADATA_RULE,
    WINDOW_PATTERN,
    BatchCreate,
    BatchList,
    BatchOut,
    check_window,
    is_id,
    metadata_ok,
)
from lorry.api.tenant_slots import tenant_slots
from lorry.api.upload import CHUNK, file_lines, spool_lines, spooled_lines
from lorry.scheduler import errors
from lorry.scheduler.batch_files import jsonl

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def parse_metadata(raw: str | None) -> dict[str, str]:
    """The batch's metadata from its query parameter (a flat JSON object of strings)."""
    if not raw:
        return {}
    problem = check_json(raw.encode("utf-8", "surrogatepass"), max_depth=1)
    if problem is not None:
        raise ApiError(422, f"{METADATA_RULE}: {problem.message}", code=problem.code,
                       param="metadata")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ApiError(422, f"metadata is not valid JSON: {e}", code="invalid_json",
                       param="metadata") from None
    if not metadata_ok(meta):
        raise ApiError(422, METADATA_RULE, code="invalid_metadata", param="metadata")
    return meta


SHOWN_ERRORS = 1000  # refused lines listed under a Batch's errors (the error file has all)
CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": BatchCreate.model_json_schema()},
    "application/jsonl": {"schema": {"type": "string", "description": "OpenAI Batch lines"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}


class NoValidLines(Exception):
    """A one-step upload none of whose lines can be queued (nothing is created)."""


def _shown(queue, tenant, info) -> list[dict] | None:
    if not info.rejected:
        return None
    return [line_error_dict(e) for e in queue.batch_errors(info.id, tenant.id, SHOWN_ERRORS)]


def _spool_file(queue, tenant, source):
    """The file's bytes copied to a temporary file (memory up to 8 MiB, then disk), read
    before the batch's transaction begins. 404 when the file is deleted meanwhile (no batch
    is made of a part of it)."""
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    try:
        for chunk in queue.file_content(source.id, tenant.id):
            spool.write(chunk)
        if spool.tell() < source.bytes:  # deleted before its first chunk was read
            raise errors.FileGone(f"file {source.id!r} was deleted while it was read")
    except errors.FileGone as e:
        spool.close()
        raise ApiError(404, f"{e}; no batch was created", code="file_not_found",
                       param="input_file_id") from None
    spool.seek(0)
    return spool


def _request_lines(spool) -> int:
    """Lines that are not blank (as the ingest skips them); the spool is rewound."""
    count = sum(1 for line in spool if line.strip())
    spool.seek(0)
    return count


async def _json_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _ingest(queue, tenant, settings, lines, stats: IngestStats, *, one_step: bool, **kw):
    """queue.ingest_batch over the parsed lines (in this worker thread)."""
    chunks = ingest_chunks(lines, queue, tenant, base_model_name(settings), settings,
                           endpoint=kw.get("endpoint"), stats=stats)

    def checked():
        yield from chunks
        # nothing stored: a one-step upload with no valid line, or any input with no request
        # line at all (empty, or blank lines only)
        if one_step and not stats.accepted or not (stats.accepted or stats.rejected):
            raise NoValidLines()
    return queue.ingest_batch(tenant.id, checked(), model=base_model_name(settings), **kw)


@router.post("", response_model=BatchOut, status_code=201, responses=responses(404, 413, 429),
             openapi_extra=CREATE_BODY,
             summary="Create a batch: JSON {input_file_id, endpoint, completion_window, "
                     "metadata} (OpenAI's SDK), or a JSONL body / multipart 'file' in one step; "
                     "bad lines are reported per line (errors, error file), good lines queued")
async def create_batch(request: Request, response: Response, tenant=Depends(get_tenant),
                       queue=Depends(get_queue), settings=Depends(get_settings),
                       idempotency_key: str | None = IDEMPOTENCY_KEY,
                       completion_window: str = Query("24h", pattern=WINDOW_PATTERN),
                       metadata: str | None = Query(None, max_length=8192,
                                                    description="a JSON object of strings "
                                                                "(one-step upload)")):
    slots = tenant_slots(request, "ingests")  # each reads up to a whole file, on disk
    token = await slots.enter(tenant.id, settings.max_open_ingests)
    try:
        # a batch writes its refused lines, then its output and error files: none past the
        # tenant's storage limit (refused lines of all-invalid batches would grow unbounded)
        stored = await run_in_threadpool(queue.stored_bytes, tenant.id)
        if stored >= settings.max_file_bytes_per_tenant and (
                idempotency_key is None or await run_in_threadpool(
                    queue.batch_by_key, tenant.id, idempotency_key) is None):
            # (a retry of a create that happened answers with its batch, as before)
            raise errors.StorageFull(tenant.id, stored, 0, settings.max_file_bytes_per_tenant)
        if is_json(request.headers.get("content-type")):
            return await _create_from_file(request, response, tenant, queue, settings,
                                           idempotency_key)
        return await _create_in_one_step(request, response, tenant, queue, settings,
                                         idempotency_key, completion_window, metadata)
    finally:
        await slots.leave(tenant.id, token)


async def _create_in_one_step(request, response, tenant, queue, settings, idempotency_key,
                              completion_window, metadata):
    meta = parse_metadata(metadata)
    try:
        check_window(completion_window)
    except ValueError as e:
        raise ApiError(422, str(e), param="completion_window") from None
    spool = await spool_lines(request, settings.max_body_bytes, settings.max_batch_lines,
                              settings.max_line_bytes)
    stats = IngestStats()
    try:
        info, created = await run_in_threadpool(
            _ingest, queue, tenant, settings, spooled_lines(spool), stats, one_step=True,
            metadata=meta, completion_window=completion_window,
            idempotency_key=idempotency_key)
    except DuplicateCustomId as e:
        first = e.errors[0]
        raise ApiError(422, first["message"], code=first["code"], param=first["param"],
                       lines=e.errors) from None
    except NoValidLines:
        if not stats.rejected:
            raise ApiError(422, "the batch file has no request lines",
                           code="empty_batch") from None
        refused = [line_error_dict(e) for e in stats.refused]
        raise ApiError(422, f"no line of the batch file is valid; {refused[0]['message']}",
                       code="no_valid_lines", lines=refused) from None
    finally:
        spool.close()
    if created:   # off the event loop: an unresponsive Redis would stall every request
        await run_in_threadpool(nudge, request, stats.accepted)
    response.status_code = 201 if created else 200
    return batch_out(info, _shown(queue, tenant, info))


async def _create_from_file(request, response, tenant, queue, settings, idempotency_key):
    raw = await _json_body(request, settings.max_line_bytes)
    problem = check_json(raw)
    if problem is not None:
        raise ApiError(422, f"the body is refused: {problem.message}", code=problem.code,
                       param=problem.param)
    try:
        body = BatchCreate.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors()]) from None
    if idempotency_key is not None:   # a retry: its batch, without reading the file again
        known = await run_in_threadpool(queue.batch_by_key, tenant.id, idempotency_key)
        if known is not None:
            _same_request(known, body, idempotency_key)
            response.status_code = 200
            return batch_out(known, _shown(queue, tenant, known))
    source = await run_in_threadpool(queue.get_file, body.input_file_id, tenant.id)
    if source is None:
        raise no_file(body.input_file_id, "input_file_id")
    if source.purpose != "batch":
        raise ApiError(400, f"file {source.id!r} has purpose {source.purpose!r}; a batch reads "
                            "a file uploaded with purpose='batch'", code="invalid_purpose",
                       param="input_file_id")
    spool = await run_in_threadpool(_spool_file, queue, tenant, source)
    if source.lines > settings.max_batch_lines:   # blank lines are skipped: count requests
        requests = await run_in_threadpool(_request_lines, spool)
        if requests > settings.max_batch_lines:
            spool.close()
            raise ApiError(413, f"file {source.id!r} has {requests} request lines, over the "
                                f"limit of {settings.max_batch_lines} lines; split it into "
                                "smaller files", param="input_file_id")
    lines = file_lines(iter(lambda: spool.read(CHUNK * 16), b""), settings.max_line_bytes)
    stats = IngestStats()
    try:
        info, created = await run_in_threadpool(
            _ingest, queue, tenant, settings, lines, stats, one_step=False,
            endpoint=body.endpoint, completion_window=body.completion_window,
            metadata=body.metadata, input_file_id=source.id, idempotency_key=idempotency_key,
            output_expires_seconds=body.output_expires_after.seconds
            if body.output_expires_after else None)
    except DuplicateCustomId as e:
        first = e.errors[0]
        raise ApiError(422, first["message"], code=first["code"], param=first["param"],
                       lines=e.errors) from None
    except NoValidLines:   # as the one-step upload answers an empty body
        raise ApiError(422, f"file {source.id!r} has no request lines; a batch needs at least "
                            "one", code="empty_batch", param="input_file_id") from None
    finally:
        spool.close()
    if created and stats.accepted:
        await run_in_threadpool(nudge, request, stats.accepted)
    if not created:   # a concurrent create under the key won: the same request?
        _same_request(info, body, idempotency_key)
    response.status_code = 201 if created else 200
    return batch_out(info, _shown(queue, tenant, info))


def _same_request(known, body, key: str) -> None:
    """409 when the batch made under ``key`` was of another input file or endpoint: answering
    with it would drop this request unseen (a bulk audit)."""
    if (known.input_file_id, known.endpoint) != (body.input_file_id, body.endpoint):
        raise ApiError(409, f"Idempotency-Key {key!r} was used for batch {known.id} (input "
                            f"file {known.input_file_id}, endpoint {known.endpoint}); send a "
                            "new key for another request", code="idempotency_key_reused",
                       headers=NO_RETRY)


@router.get("", response_model=BatchList,
            summary="List your batches, newest first (cursor: after = the last id seen)")
def list_batches(tenant=Depends(get_tenant), queue=Depends(get_queue),
                 after: str | None = Query(None, max_length=64),
                 limit: int = Query(20, ge=1, le=100)):
    if after is not None and not is_id(after):
        raise _no_batch(after, "after")
    try:
        found = queue.list_batches(tenant.id, after=after, limit=limit + 1)
    except ValueError as e:
        raise ApiError(404, str(e), code="batch_not_found", param="after") from None
    page = found[:limit]
    return BatchList(data=[batch_out(b) for b in page], has_more=len(found) > limit,
                     first_id=page[0].id if page else None,
                     last_id=page[-1].id if page else None)


def _batch(queue, tenant, batch_id: str):
    info = queue.get_batch(batch_id, tenant.id) if is_id(batch_id) else None
    if info is None:
        raise _no_batch(batch_id)
    return info


def _no_batch(batch_id: str, param: str = "batch_id") -> ApiError:
    return ApiError(404, f"no batch {batch_id!r}", code="batch_not_found", param=param)


@router.get("/{batch_id}", response_model=BatchOut, responses=responses(404),
            summary="Get a batch (status, counts)")
def get_batch(batch_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    info = _batch(queue, tenant, batch_id)
    return batch_out(info, _shown(queue, tenant, info))


@router.post("/{batch_id}/cancel", response_model=BatchOut, responses=responses(404),
             summary="Cancel a batch")
def cancel_batch(batch_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    info = queue.cancel_batch(batch_id, tenant.id) if is_id(batch_id) else None
    if info is None:
        raise _no_batch(batch_id)
    return batch_out(info, _shown(queue, tenant, info))


def _lines(queue, tenant, batch_id: str, model_name: str, succeeded: bool):
    final = {"failed", "cancelled", "expired"}
    for job in queue.batch_results(batch_id, tenant.id):
        if (job.status == "succeeded") if succeeded else (job.status in final):
            yield jsonl(output_line(job, model_name))   # as the output file holds it


def _file(kind: str, succeeded: bool):
    def handler(batch_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue),
                settings=Depends(get_settings)):
        _batch(queue, tenant, batch_id)
        return StreamingResponse(_lines(queue, tenant, batch_id, base_model_name(settings),
                                        succeeded), media_type="application/jsonl")
    handler.__name__ = f"batch_{kind}"
    return handler


router.add_api_route("/{batch_id}/output", _file("output", True), methods=["GET"],
                     responses=responses(404), response_class=StreamingResponse,
                     summary="The batch's output file: one OpenAI response line per "
                             "succeeded request")
router.add_api_route("/{batch_id}/errors", _file("errors", False), methods=["GET"],
                     responses=responses(404), response_class=StreamingResponse,
                     summary="The batch's error file: failed, cancelled and expired requests")
