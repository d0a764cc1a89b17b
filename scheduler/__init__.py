"""The job queue: SQL tables, claim policy, leases and the one gateway (JobQueue); every
statement is in scheduler.queries, every driver error becomes a scheduler.errors type at
scheduler.connector."""
from __future__ import annotations

from lorry.scheduler import errors
from lorry.scheduler.types import (
    AdapterInfo,
    BatchInfo,
    ClaimedJob,
    FileInfo,
    JobInfo,
    JobSpec,
    LineError,
    MicroBatch,
    Result,
    TenantInfo,
)

__all__ = [
    "AdapterInfo",
    "BatchInfo",
    "ClaimedJob",
    "FileInfo",
    "JobInfo",
    "JobQueue",
    "JobSpec",
    "LineError",
    "MicroBatch",
    "Result",
    "TenantInfo",
    "errors",
]


def __getattr__(name: str):
    # JobQueue pulls in SQLAlchemy; the dataclasses above stay importable without it.
    if name == "JobQueue":
        from lorry.scheduler.gateway import JobQueue
        return JobQueue
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
