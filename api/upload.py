"""Read an uploaded JSONL file (raw body or multipart) as numbered lines, within size limits."""
from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator

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


def file_lines(chunks, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line bytes) of a stored file's chunks; a line longer than
    ``max_line_bytes`` comes as None (its bytes are skipped, never held)."""
    number, pending, oversize = 0, bytearray(), False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not oversize:
                pending += piece
                if len(pending) > max_line_bytes:
                    oversize, pending = True, bytearray()
            if end < 0:
                break
            number += 1
            yield number, None if oversize else bytes(pending)
            pending, oversize, start = bytearray(), False, end + 1
    if oversize or pending.strip():
        yield number + 1, None if oversize else bytes(pending)


async def spool_lines(request: Request, max_bytes: int, max_lines: int, max_line_bytes: int):
    """The upload's lines (``read_lines``' limits) written to a temporary file (in memory up
    to 8 MiB, then on disk), rewound; its lines are read back in a worker thread."""
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    async for number, line in read_lines(request, max_bytes, max_lines, max_line_bytes):
        spool.write(line.rstrip(b"\r") + b"\n")
    spool.seek(0)
    return spool


def spooled_lines(spool) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(spool, start=1):
        yield number, line.rstrip(b"\n")
