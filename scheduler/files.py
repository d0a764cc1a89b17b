"""OpenAI Files: uploads and batch output/error files, stored in the database as chunk rows
(never in a process's memory). JobQueue mixin."""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import timedelta

from lorry.scheduler import errors
from lorry.scheduler import queries as q
from lorry.scheduler.rows import file_info
from lorry.scheduler.types import FileInfo

CHUNK_BYTES = 1 << 20  # one row of file_chunks; a download reads one at a time
PURPOSES = ("batch", "batch_output")  # batch: uploaded by a tenant; batch_output: built here


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def _rechunk(pieces: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of pieces as blocks of ``size`` (the last one shorter)."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def write_chunks(conn, file_id: str, pieces: Iterable[bytes]) -> tuple[int, int]:
    """Store pieces as the file's chunk rows in the caller's transaction; (bytes, lines).
    A last line without a trailing newline counts as a line."""
    size = lines = 0
    last = b"\n"
    for seq, block in enumerate(_rechunk(pieces)):
        conn.execute(q.INSERT_CHUNK, dict(file_id=file_id, seq=seq, data=block))
        size += len(block)
        lines += block.count(b"\n")
        last = block[-1:]
    if size and last != b"\n":
        lines += 1
    return size, lines


class FileOps:
    def create_file(self, tenant_id: str, content: Iterable[bytes], *, filename: str,
                    purpose: str = "batch", idempotency_key: str | None = None,
                    max_tenant_bytes: int | None = None,
                    expires_after_s: int | None = None) -> tuple[FileInfo, bool]:
        """Store an upload (content: its bytes, in pieces) as one file of the tenant.

        Returns (file, created): a known idempotency_key returns the tenant's file of that
        key and stores nothing (content is not read). Raises InvalidJob for a bad purpose,
        filename or key, UnknownTenant, StorageFull when the tenant's files would then hold
        more than max_tenant_bytes (nothing is stored). ``expires_after_s``: the maintenance
        pass deletes it that long after its creation (OpenAI's expires_after).
        """
        if purpose not in PURPOSES:
            raise errors.InvalidJob(f"purpose must be one of {list(PURPOSES)}, got {purpose!r}")
        from lorry.scheduler.jobs import unstorable
        for what, value, limit in (("filename", filename, 255),
                                   ("idempotency_key", idempotency_key, 200)):
            if value is None and what == "idempotency_key":
                continue
            problem = unstorable(value) if isinstance(value, str) else "no text"
            if problem or not value or len(value) > limit:
                raise errors.InvalidJob(f"{what} must be text of 1 to {limit} characters "
                                        f"without NUL or lone surrogates, got {value!r:.80}")
        if idempotency_key is not None:
            known = self._file_by_key(tenant_id, idempotency_key)
            if known is not None:
                return known, False
        file_id = new_file_id()
        try:
            with self.connector.begin() as conn:
                if conn.execute(q.tenant_exists(tenant_id)).first() is None:
                    raise errors.UnknownTenant(f"tenant {tenant_id!r} does not exist")
                now = self.now()
                row = dict(id=file_id, tenant_id=tenant_id, purpose=purpose, filename=filename,
                           bytes=0, lines=0, status="processed", created_at=now,
                           batch_id=None, idempotency_key=idempotency_key,
                           expires_at=_expiry(now, expires_after_s))
                conn.execute(q.INSERT_FILE, row)
                size, lines = write_chunks(conn, file_id, content)
                if max_tenant_bytes is not None:
                    if conn.dialect.name == "postgresql":  # SQLite's writers are serialized
                        conn.execute(q.storage_lock(tenant_id))
                    stored = conn.execute(q.stored_bytes(tenant_id, file_id)).scalar_one()
                    if stored + size > max_tenant_bytes:
                        raise errors.StorageFull(tenant_id, int(stored), size, max_tenant_bytes)
                conn.execute(q.set_file_size(file_id, size, lines))
                return file_info(_Row(dict(row, bytes=size, lines=lines))), True
        except errors.DuplicateKey:
            # A concurrent upload with the same key won: answer with its file.
            known = None if idempotency_key is None else self._file_by_key(tenant_id,
                                                                           idempotency_key)
            if known is None:
                raise
            return known, False

    def build_file(self, conn, tenant_id: str, lines: Iterable[bytes], *, filename: str,
                   batch_id: str | None, expires_after_s: int | None = None) -> str | None:
        """A "batch_output" file of lines, in the caller's transaction; None (and no file)
        when lines is empty."""
        file_id, now = new_file_id(), self.now()
        conn.execute(q.INSERT_FILE, dict(id=file_id, tenant_id=tenant_id, purpose="batch_output",
                                         filename=filename, bytes=0, lines=0, status="processed",
                                         created_at=now, batch_id=batch_id,
                                         idempotency_key=None,
                                         expires_at=_expiry(now, expires_after_s)))
        size, count = write_chunks(conn, file_id, lines)
        if not count:
            conn.execute(q.delete_file(file_id))
            return None
        conn.execute(q.set_file_size(file_id, size, count))
        return file_id

    def _file_by_key(self, tenant_id: str, key: str) -> FileInfo | None:
        with self.connector.connect() as conn:
            row = conn.execute(q.file_by_key(tenant_id, key)).first()
        return None if row is None else file_info(row)

    def get_file(self, file_id: str, tenant_id: str | None) -> FileInfo | None:
        """The file, or None when unknown or another tenant's (tenant_id given)."""
        with self.connector.connect() as conn:
            row = conn.execute(q.file(file_id, tenant_id)).first()
        return None if row is None else file_info(row)

    def list_files(self, tenant_id: str, *, purpose: str | None = None, after: str | None = None,
                   limit: int = 20, order: str = "desc") -> list[FileInfo]:
        """The tenant's files by creation time (order "desc": newest first); ``after`` is the
        last id of the previous page (unknown: ValueError)."""
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise ValueError(f"limit must be an int in [1, 100000], got {limit!r}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        with self.connector.connect() as conn:
            mark = None
            if after is not None:
                ref = conn.execute(q.file_created(after, tenant_id)).first()
                if ref is None:
                    raise ValueError(f"after={after!r} is not a file id of this tenant")
                mark = (ref.created_at, after)
            rows = conn.execute(q.files_page(tenant_id, purpose=purpose, after=mark,
                                             order=order, limit=limit)).all()
        return [file_info(r) for r in rows]

    def file_content(self, file_id: str, tenant_id: str | None) -> Iterator[bytes]:
        """The file's bytes, one chunk row per query (constant memory, no connection held
        between chunks); nothing for an unknown file (check with get_file first). Raises
        FileGone when the file is deleted before its last chunk was read."""
        info = self.get_file(file_id, tenant_id)
        if info is None:
            return
        seq = size = 0
        while True:
            with self.connector.connect() as conn:
                data = conn.execute(q.file_chunk(file_id, seq)).scalar()
            if data is None:
                if size < info.bytes:
                    raise errors.FileGone(f"file {file_id!r} was deleted while it was read "
                                          f"({size} of its {info.bytes} bytes read)")
                return
            size += len(data)
            yield bytes(data)
            seq += 1

    def stored_bytes(self, tenant_id: str) -> int:
        """What the tenant's files (uploads, outputs, error files) hold together."""
        with self.connector.connect() as conn:
            return int(conn.execute(q.stored_bytes(tenant_id, "")).scalar_one())

    def delete_expired_files(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` files past their expires_at (each with its bytes, in a
        transaction of its own); how many."""
        with self.connector.connect() as conn:
            ids = [r.id for r in conn.execute(q.expired_files(self.now(), limit))]
        return sum(self.delete_file(file_id, None) for file_id in ids)

    def delete_file(self, file_id: str, tenant_id: str | None) -> bool:
        """Delete the tenant's file and its bytes; False when there is no such file. Batches
        that name it keep their results (a deleted output file is gone for good)."""
        with self.connector.begin() as conn:
            if conn.execute(q.file_exists(file_id, tenant_id)).first() is None:
                return False
            conn.execute(q.delete_file_chunks(file_id))
            conn.execute(q.delete_file(file_id))
        return True


def _expiry(now, seconds: int | None):
    return None if seconds is None else now + timedelta(seconds=seconds)


class _Row:
    def __init__(self, d: dict):
        self.__dict__.update(d)
