"""Read an uploaded JSONL file (raw body or multipart) as numbered lines, within size limits."""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile

from lorry.api.errors import ApiError

CHUNK = 64 * 1024


def _too_large(what: str, limit: int, unit: str) -> ApiError:
    return ApiError(413, f"{what} exceeds the limit of {limit} {unit}; split the batch "
                         "into smaller files")


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    """The file's bytes: the 'file' part of a multipart form, else the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "multipart upload needs a 'file' part holding the JSONL file",
                           code="missing_file", param="file")
        while chunk := await upload.read(CHUNK):
            yield chunk
        await form.close()
    else:
        async for chunk in request.stream():
            yield chunk


async def read_lines(request: Request, max_bytes: int, max_lines: int,
                     max_line_bytes: int) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (1-based line number, line bytes); 413 as soon as a limit is passed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise _too_large("the upload", max_bytes, "bytes")
    total, number, pending = 0, 0, b""
    async for chunk in _chunks(request):
        total += len(chunk)
        if total > max_bytes:
            raise _too_large("the upload", max_bytes, "bytes")
        pending += chunk
        *complete, pending = pending.split(b"\n")
        if len(pending) > max_line_bytes:
            raise _too_large(f"line {number + len(complete) + 1}", max_line_bytes, "bytes")
        for line in complete:
            number += 1
            if len(line) > max_line_bytes:
                raise _too_large(f"line {number}", max_line_bytes, "bytes")
            if number > max_lines:
                raise _too_large("the file", max_lines, "lines")
            yield number, line
    if pending.strip():
        number += 1
        if number > max_lines:
            raise _too_large("the file", max_lines, "lines")
        yield number, pending
