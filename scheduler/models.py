"""SQLAlchemy 2.0 tables of the job queue (the Alembic migrations create exactly these)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime()}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # API keys are "lorry_<key_id>_<secret>": key_id finds the row, the sha256 checks it.
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    # Fair-share virtual time: jobs claimed / weight (see scheduler.policy).
    served: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    created_at: Mapped[datetime]


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_key", "name", name="uq_adapters_tenant_name"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # tenant_id or "" for shared adapters: NULLs are never equal in a UNIQUE constraint.
    tenant_key: Mapped[str] = mapped_column(String(40))
    source: Mapped[str] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(200))
    base_model: Mapped[str | None] = mapped_column(Text)
    rank: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime]


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("uq_batches_tenant_idempotency", "tenant_id", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL"),
              sqlite_where=text("idempotency_key IS NOT NULL")),
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           index=True)
    status: Mapped[str] = mapped_column(String(20))
    completion_window: Mapped[str] = mapped_column(String(10))
    total: Mapped[int] = mapped_column(Integer)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    # OpenAI's Batch fields: the uploaded input file, the files built when it finalizes.
    endpoint: Mapped[str | None] = mapped_column(String(40))
    input_file_id: Mapped[str | None] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    # The base model's name as output lines of base-model requests show it.
    model: Mapped[str | None] = mapped_column(String(200))
    # Lines refused at creation (in batch_rejects): counted in total and failed.
    rejected: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # OpenAI's output_expires_after: its output and error files expire this long after built
    output_expires_seconds: Mapped[int | None] = mapped_column(Integer)
    # OpenAI's Batch.usage: the succeeded requests' prompt and completion tokens, summed when
    # the batch finalizes (null before, and for batches finalized before migration 0008)
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # ... and of those input tokens, the ones served from the prefix cache (migration 0009)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)


class BatchReject(Base):
    """A line of a batch's input that was refused at creation (kept for the error file and
    the batch's ``errors``)."""

    __tablename__ = "batch_rejects"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"),
                                          primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    custom_id: Mapped[str | None] = mapped_column(Text)
    code: Mapped[str] = mapped_column(String(64))
    param: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)


class File(Base):
    """An OpenAI File: a tenant's upload (purpose "batch") or a batch's output or error file
    (purpose "batch_output"); its bytes are rows of file_chunks."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_files_expires", "expires_at", postgresql_where=text("expires_at IS NOT NULL"),
              sqlite_where=text("expires_at IS NOT NULL")),
        Index("uq_files_tenant_idempotency", "tenant_id", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL"),
              sqlite_where=text("idempotency_key IS NOT NULL")),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime]
    batch_id: Mapped[str | None] = mapped_column(String(40))  # batch_output: whose file
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None]   # deleted by the maintenance pass after this


class FileChunk(Base):
    """Up to ``scheduler.files.CHUNK_BYTES`` of a file, in order of ``seq``."""

    __tablename__ = "file_chunks"
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"),
                                         primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # Partial indexes skip the common rows (no key, no batch): fewer index entries to
        # write per enqueued job, and per claimed job (a claim's UPDATE is not HOT).
        Index("uq_jobs_tenant_idempotency", "tenant_id", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL"),
              sqlite_where=text("idempotency_key IS NOT NULL")),
        # The claim reads only queued rows of one group in enqueue order.
        Index("ix_jobs_queued_group", "tenant_id", "adapter_id", "priority", "enqueued_at",
              postgresql_where=text("status = 'queued'"), sqlite_where=text("status = 'queued'")),
        Index("ix_jobs_running_lease", "lease_expires_at",
              postgresql_where=text("status = 'running'"),
              sqlite_where=text("status = 'running'")),
        Index("ix_jobs_deadline", "deadline", postgresql_where=text("deadline IS NOT NULL"),
              sqlite_where=text("deadline IS NOT NULL")),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_batch", "batch_id", "seq", postgresql_where=text("batch_id IS NOT NULL"),
              sqlite_where=text("batch_id IS NOT NULL")),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # No foreign keys on jobs (tenant_id, batch_id): PostgreSQL checks one per inserted row,
    # about half of a bulk enqueue's server time. The gateway checks the tenant (and creates
    # the batch) in the submit's transaction; nothing deletes tenants or batches, and a
    # future delete must delete their jobs too.
    tenant_id: Mapped[str] = mapped_column(String(40))
    adapter_id: Mapped[int] = mapped_column(BigId)  # 0 = base model (no FK: adapters may go)
    adapter_name: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[Any] | None]
    sampling: Mapped[dict[str, Any]]
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    enqueued_at: Mapped[datetime]  # when it (re)entered the queue or becomes eligible
    not_before: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(40))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result_text: Mapped[str | None] = mapped_column(Text)
    result_token_ids: Mapped[list[Any] | None]
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # of prompt_tokens, those the engine served from its prefix cache (null before 0009)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    timings: Mapped[dict[str, Any] | None]
    result_logprobs: Mapped[list[Any] | None]  # per output token, when the job asked for them
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    batch_id: Mapped[str | None] = mapped_column(String(40))  # no FK: see tenant_id
    seq: Mapped[int | None] = mapped_column(Integer)  # position in its submit / batch file
    custom_id: Mapped[str | None] = mapped_column(String(512))  # CUSTOM_ID_LENGTH
    idempotency_key: Mapped[str | None] = mapped_column(String(200))


class QueueGroup(Base):
    """Queued-job summary per (tenant, adapter, priority), kept in step by every transition,
    so that a claim never aggregates the jobs table. adapter_id 0 = base model."""

    __tablename__ = "queue_groups"
    __table_args__ = (
        Index("ix_queue_groups_tenant", "tenant_id", "priority", "oldest_enqueued_at",
              postgresql_where=text("queued_count > 0"), sqlite_where=text("queued_count > 0")),
        Index("ix_queue_groups_adapter", "adapter_id",
              postgresql_where=text("queued_count > 0"), sqlite_where=text("queued_count > 0")),
        Index("ix_queue_groups_oldest", "oldest_enqueued_at",
              postgresql_where=text("queued_count > 0"), sqlite_where=text("queued_count > 0")),
    )
    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    priority: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    queued_count: Mapped[int] = mapped_column(Integer)
    oldest_enqueued_at: Mapped[datetime | None]


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    heartbeat_at: Mapped[datetime]
    hot: Mapped[list[Any]]
    warm: Mapped[list[Any]]
    capacity: Mapped[int] = mapped_column(Integer, default=0)


class MaintenanceRun(Base):
    """When a periodic task last finished a pass; "lease_reaper": the requeue of expired
    leases (beat's maintain, or a claim). The migration records the schema's creation as
    its first run, so a reaper that never runs shows as late (/readyz)."""

    __tablename__ = "maintenance_runs"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    last_run_at: Mapped[datetime]
