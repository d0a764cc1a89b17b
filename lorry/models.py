"""Typed objects the client returns (jobs, batches, adapters, batch result lines)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

FINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
FINAL_BATCH_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})


class _Model(BaseModel):
    # extra="allow": a newer server may add fields; an older client must keep working.
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Model):
    cached_tokens: int = 0   # prompt tokens served from the engine's prefix cache


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class JobResult(_Model):
    text: str
    token_ids: list[int] = []
    finish_reason: str | None = None
    usage: Usage = Usage()


class Job(_Model):
    """One generation job as the server reports it."""

    id: str
    status: str
    adapter: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: dict[str, Any] = {}
    priority: int = 0
    attempts: int = 0
    batch_id: str | None = None
    custom_id: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: JobResult | None = None
    error: str | None = None
    cancel_requested: bool = False  # a cancel was asked while it ran (on its way if running)

    @property
    def done(self) -> bool:
        return self.status in FINAL_JOB_STATUSES

    @property
    def text(self) -> str | None:
        return self.result.text if self.result else None


class JobPage(_Model):
    data: list[Job]
    has_more: bool = False
    next_cursor: str | None = None


class RequestCounts(_Model):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(_Model):
    """An OpenAI-Batch-shaped batch."""

    id: str
    object: str = "batch"
    status: str
    endpoint: str | None = None
    completion_window: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: RequestCounts = RequestCounts()
    created_at: int | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelled_at: int | None = None
    expired_at: int | None = None
    metadata: dict[str, Any] | None = None
    errors: dict[str, Any] | None = None
    cancelling_at: int | None = None
    model: str | None = None                  # the base model's name
    usage: dict[str, Any] | None = None       # OpenAI's Batch.usage, once finalized

    @property
    def line_errors(self) -> list[dict[str, Any]]:
        """Input lines refused when the batch was created: {line, custom_id, code, message}."""
        return list((self.errors or {}).get("data") or [])

    @property
    def done(self) -> bool:
        return self.status in FINAL_BATCH_STATUSES


class BatchPage(_Model):
    data: list[Batch]
    has_more: bool = False
    last_id: str | None = None


class File(_Model):
    """An uploaded file (purpose "batch") or a batch's output/error file ("batch_output")."""

    id: str
    object: str = "file"
    bytes: int = 0
    created_at: int | None = None
    filename: str | None = None
    purpose: str | None = None
    status: str | None = None


class BatchResultLine(_Model):
    """One line of a batch's output or errors file (OpenAI's shape)."""

    id: str | None = None
    custom_id: str | None = None
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str | None:
        """The generated text of a successful line (chat or text completion)."""
        if not self.response:
            return None
        choice = self.response.get("body", {}).get("choices", [{}])[0]
        if "message" in choice:
            return choice["message"].get("content")
        return choice.get("text")


class Adapter(_Model):
    id: int
    name: str
    source: str
    revision: str | None = None
    rank: int | None = None
    status: str = "ready"
    shared: bool = False


class AdapterPage(_Model):
    data: list[Adapter]
