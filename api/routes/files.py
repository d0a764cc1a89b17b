"""OpenAI Files: upload (multipart, purpose "batch"), list, retrieve, content, delete. The
bytes live in the job database (``JobQueue.create_file``), never in this process."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from lorry.api.convert import file_out
from lorry.api.deps import get_queue, get_settings, get_tenant
from lorry.api.errors import ApiError, responses
from lorry.api.schemas import EXPIRY_SECONDS, FileDeleted, FileList, FileOut, is_id
from lorry.api.upload import CHUNK

router = APIRouter(prefix="/v1/files", tags=["files"])
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "an OpenAI Batch JSONL file"},
                   "purpose": {"type": "string", "enum": ["batch"]}}}}}}}
IDEMPOTENCY_KEY = Header(None, alias="Idempotency-Key", max_length=200,
                         description="a retry with the same key returns the same object and "
                                     "creates nothing new")


def no_file(file_id: str, param: str = "file_id") -> ApiError:
    return ApiError(404, f"no file {file_id!r}", code="file_not_found", param=param)


def _file(queue, tenant, file_id: str):
    info = queue.get_file(file_id, tenant.id) if is_id(file_id) else None
    if info is None:
        raise no_file(file_id)
    return info


def _pieces(upload: UploadFile, limit: int):
    """The uploaded file's bytes in blocks, read in a worker thread; 413 past ``limit``."""
    upload.file.seek(0)
    total = 0
    while block := upload.file.read(CHUNK * 16):
        total += len(block)
        if total > limit:
            raise ApiError(413, f"the file exceeds the limit of {limit} bytes; split it into "
                                "smaller files", param="file")
        yield block


@router.post("", response_model=FileOut, status_code=201, responses=responses(400, 413),
             openapi_extra=UPLOAD_BODY,
             summary="Upload a file (multipart 'file' + purpose='batch'); 200 with the earlier "
                     "file when the Idempotency-Key was used before")
async def upload_file(request: Request, response: Response, tenant=Depends(get_tenant),
                      queue=Depends(get_queue), settings=Depends(get_settings),
                      idempotency_key: str | None = IDEMPOTENCY_KEY):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "upload the file as multipart/form-data with a 'file' part and "
                            "purpose='batch'", code="invalid_content_type")
    form = await request.form(max_files=1, max_fields=8)
    try:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise ApiError(400, "the 'purpose' part is missing; Lorry accepts purpose='batch'",
                           code="missing_purpose", param="purpose")
        if purpose != "batch":
            raise ApiError(400, f"purpose {purpose[:64]!r} is not supported; Lorry accepts "
                                "purpose='batch' (batch input files)",
                           code="invalid_purpose", param="purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the 'file' part is missing: send the JSONL file as the "
                                "multipart part 'file'", code="missing_file", param="file")
        filename = (upload.filename or "upload.jsonl")[-255:]
        expires = _expires_after(form)
        info, created = await run_in_threadpool(
            queue.create_file, tenant.id, _pieces(upload, settings.max_body_bytes),
            filename=filename, purpose="batch", idempotency_key=idempotency_key,
            max_tenant_bytes=settings.max_file_bytes_per_tenant, expires_after_s=expires)
    finally:
        await form.close()
    response.status_code = 201 if created else 200
    return file_out(info)


def _expires_after(form) -> int | None:
    """OpenAI's ``expires_after`` of an upload (the SDK sends ``expires_after[anchor]`` and
    ``expires_after[seconds]`` parts): its seconds, or None; 400 naming what is wrong."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    low, high = EXPIRY_SECONDS
    if anchor != "created_at":
        raise ApiError(400, "expires_after.anchor must be 'created_at'",
                       code="invalid_value", param="expires_after.anchor")
    if not isinstance(seconds, str) or not seconds.isascii() or not seconds.isdigit() \
            or not low <= int(seconds) <= high:
        raise ApiError(400, f"expires_after.seconds must be a whole number of seconds from "
                            f"{low} (an hour) to {high} (30 days)",
                       code="invalid_value", param="expires_after.seconds")
    return int(seconds)


@router.get("", response_model=FileList, summary="List your files, newest first (cursor: "
                                                  "after = the last id of the previous page)")
def list_files(tenant=Depends(get_tenant), queue=Depends(get_queue),
               purpose: str | None = Query(None, max_length=20, pattern=r"^[A-Za-z0-9_-]+$"),
               after: str | None = Query(None, max_length=64),
               limit: int = Query(10_000, ge=1, le=10_000),
               order: str = Query("desc", pattern="^(asc|desc)$")):
    if after is not None and not is_id(after):
        raise no_file(after, "after")
    try:
        files = queue.list_files(tenant.id, purpose=purpose, after=after, limit=limit + 1,
                                 order=order)
    except ValueError as e:
        raise ApiError(404, str(e), code="file_not_found", param="after") from None
    more = len(files) > limit
    files = files[:limit]
    return FileList(data=[file_out(f) for f in files], has_more=more,
                    first_id=files[0].id if files else None,
                    last_id=files[-1].id if files else None)


@router.get("/{file_id}", response_model=FileOut, responses=responses(404),
            summary="Get a file's metadata")
def get_file(file_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    return file_out(_file(queue, tenant, file_id))


@router.get("/{file_id}/content", responses=responses(404), response_class=StreamingResponse,
            summary="Download a file's bytes (a batch's output and error files too)")
def file_content(file_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    info = _file(queue, tenant, file_id)
    return StreamingResponse(queue.file_content(info.id, tenant.id),
                             media_type="application/octet-stream",
                             headers={"Content-Length": str(info.bytes)})


@router.delete("/{file_id}", response_model=FileDeleted, responses=responses(404),
               summary="Delete a file and its bytes")
def delete_file(file_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue)):
    if not (is_id(file_id) and queue.delete_file(file_id, tenant.id)):
        raise no_file(file_id)
    return FileDeleted(id=file_id)
