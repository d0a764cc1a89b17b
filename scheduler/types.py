"""Plain dataclasses that cross the scheduler boundary (no ORM object ever leaves the gateway)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
BATCH_STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
                  "cancelling", "cancelled")
# The error a job records when its adapter cannot be loaded (a worker's, not retried): the
# tenant's problem, which the API answers as 422 adapter_unloadable (batch error lines carry
# that code), where any other failure is 500 job_failed.
ADAPTER_FAILURE = " cannot be loaded: "


def adapter_failure(adapter: str | None, why: str) -> str:
    """The error of a job whose adapter cannot be loaded."""
    return f"adapter {adapter!r}{ADAPTER_FAILURE}{why}"


def is_adapter_failure(error: str | None) -> bool:
    """Whether a job's error is ``adapter_failure``'s."""
    return bool(error) and error.startswith("adapter ") and ADAPTER_FAILURE in error


@dataclass(frozen=True)
class JobSpec:
    """One generation request to queue: an adapter name (None = base model) and a prompt
    or chat messages, with sampling parameters (engine.SamplingParams keys)."""

    adapter: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: dict = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    deadline: datetime | None = None
    custom_id: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Result:
    """What a worker writes back for a finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0    # of prompt_tokens, those served from the engine's prefix cache
    timings: dict = field(default_factory=dict)
    # per generated token when the job asked for logprobs: {"id", "token", "logprob",
    # "top": [[id, token, logprob], ...] (most likely first)}
    logprobs: list[dict] | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to a worker; (id, lease_token) fences every later write."""

    id: str
    lease_token: str
    tenant_id: str
    adapter: str | None
    prompt: str | None
    messages: list[dict] | None
    sampling: dict
    attempts: int


@dataclass(frozen=True)
class TenantInfo:
    id: str
    name: str
    weight: float
    max_queued: int | None
    created_at: datetime | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter; `id` is stable and positive (use it as LoRARequest.lora_int_id)."""

    id: int
    name: str
    source: str
    revision: str | None
    tenant_id: str | None
    rank: int | None
    status: str
    base_model: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class MicroBatch:
    """Jobs of one adapter (None = base model) claimed together."""

    adapter: AdapterInfo | None
    jobs: list[ClaimedJob]


@dataclass(frozen=True)
class JobInfo:
    id: str
    tenant_id: str
    adapter: str | None
    status: str
    prompt: str | None
    messages: list[dict] | None
    sampling: dict
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime | None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    not_before: datetime | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    idempotency_key: str | None = None
    worker_id: str | None = None
    cancel_requested: bool = False
    error: str | None = None
    result: Result | None = None
    # submit(): True where an idempotency key returned a job queued before this call
    replayed: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class BatchInfo:
    """OpenAI-Batch-shaped: request_counts is {"total", "completed", "failed"}."""

    id: str
    tenant_id: str
    status: str
    completion_window: str
    request_counts: dict[str, int]
    metadata: dict[str, Any] | None
    created_at: datetime | None
    expires_at: datetime | None = None
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    endpoint: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    rejected: int = 0  # lines refused at creation (in total and failed)
    idempotency_key: str | None = None
    model: str | None = None           # the base model's name (Batch.model)
    input_tokens: int | None = None    # succeeded requests' prompt tokens, once finalized
    output_tokens: int | None = None   # ... and their completion tokens
    cached_tokens: int | None = None   # ... and their prompt tokens served from the prefix cache


@dataclass(frozen=True)
class LineError:
    """A batch input line refused at creation: 1-based line number, its custom_id when the
    line had one, OpenAI's code, the field (param) and the reason."""

    line: int
    code: str
    message: str
    param: str | None = None
    custom_id: str | None = None


@dataclass(frozen=True)
class FileInfo:
    """An OpenAI File: purpose "batch" (uploaded) or "batch_output" (a batch's output or
    error file); ``bytes`` and ``lines`` of its content."""

    id: str
    tenant_id: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    status: str
    created_at: datetime | None
    batch_id: str | None = None
    idempotency_key: str | None = None
    expires_at: datetime | None = None   # deleted after this (OpenAI's expires_after)
