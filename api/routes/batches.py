"""Batches: upload an OpenAI Batch JSONL file, read its status, download output/errors, cancel."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from lorry.api.batch_input import base_model_name, parse_lines, specs_from_lines
from lorry.api.convert import batch_out, output_line
from lorry.api.deps import get_queue, get_settings, get_tenant, nudge
from lorry.api.errors import ApiError, responses
from lorry.api.json_check import check_json
from lorry.api.schemas import BatchOut, is_id
from lorry.api.upload import read_lines

router = APIRouter(prefix="/v1/batches", tags=["batches"])
METADATA_RULE = ("metadata must be a JSON object of at most 16 string values of at most 512 "
                 "characters")


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
    if not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= 512
            for k, v in meta.items()):
        raise ApiError(422, METADATA_RULE, code="invalid_metadata", param="metadata")
    return meta


@router.post("", response_model=BatchOut, status_code=201, responses=responses(413, 429),
             summary="Create a batch from an OpenAI Batch JSONL file (raw body or multipart "
                     "'file'); bad lines are reported per line, good lines are queued")
async def create_batch(request: Request, tenant=Depends(get_tenant), queue=Depends(get_queue),
                       settings=Depends(get_settings),
                       completion_window: str = Query("24h", pattern=r"^[1-9][0-9]{0,3}h$"),
                       metadata: str | None = Query(None, max_length=8192,
                                                    description="a JSON object of strings")):
    meta = parse_metadata(metadata)
    lines = [item async for item in read_lines(request, settings.max_body_bytes,
                                                settings.max_batch_lines, settings.max_line_bytes)]
    parsed = parse_lines(lines)
    if parsed.duplicates:
        first = parsed.duplicates[0]
        raise ApiError(422, first["message"], code=first["code"], param=first["param"],
                       lines=parsed.duplicates)
    specs = await run_in_threadpool(specs_from_lines, parsed, queue, tenant,
                                    base_model_name(settings), settings)
    if not specs:
        parsed.errors.sort(key=lambda e: e["line"])
        if not parsed.errors:
            raise ApiError(422, "the batch file has no request lines", code="empty_batch")
        raise ApiError(422, f"no line of the batch file is valid; {parsed.errors[0]['message']}",
                       code="no_valid_lines", lines=parsed.errors)
    parsed.errors.sort(key=lambda e: e["line"])
    meta["lorry_endpoint"] = sorted(parsed.endpoints)[0] if len(parsed.endpoints) == 1 \
        else "mixed"
    if parsed.errors:
        meta["lorry_rejected_lines"] = str(len(parsed.errors))
    info = await run_in_threadpool(queue.create_batch, tenant.id, specs, metadata=meta,
                                   completion_window=completion_window)
    nudge(request, len(specs))
    return batch_out(info, parsed.errors)


def _batch(queue, tenant, batch_id: str):
    info = queue.get_batch(batch_id, tenant.id) if is_id(batch_id) else None
    if info is None:
        raise _no_batch(batch_id)
    return info


def _no_batch(batch_id: str) -> ApiError:
    return ApiError(404, f"no batch {batch_id!r}", code="batch_not_found", param="batch_id")


@router.get("/{batch_id}", response_model=BatchOut, responses=responses(404),
            summary="Get a batch (status, counts)")
def get_batch(batch_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    return batch_out(_batch(queue, tenant, batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchOut, responses=responses(404),
             summary="Cancel a batch")
def cancel_batch(batch_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    info = queue.cancel_batch(batch_id, tenant.id) if is_id(batch_id) else None
    if info is None:
        raise _no_batch(batch_id)
    return batch_out(info)


def _lines(queue, tenant, batch_id: str, model_name: str, succeeded: bool):
    final = {"failed", "cancelled", "expired"}
    for job in queue.batch_results(batch_id, tenant.id):
        if (job.status == "succeeded") if succeeded else (job.status in final):
            yield json.dumps(output_line(job, model_name)) + "\n"


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
