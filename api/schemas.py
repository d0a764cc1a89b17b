"""Request and response bodies of the REST API (pydantic; unknown fields are refused)."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # job_<hex>, batch_<hex>: nothing else is looked up
MAX_TOKENS = 4096  # per-job ceiling; the engine also refuses prompt + max_tokens > max_model_len


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError(f"NUL characters (\\u0000) are not allowed (found at index "
                         f"{value.index(chr(0))})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"a lone UTF-16 surrogate (\\u{ord(value[e.start]):04x} at index "
                             f"{e.start}) is not Unicode text; send valid UTF-8") from None
    return value


def is_id(value: str) -> bool:
    """Whether value can be a job or batch id; anything else is "not found" without a query."""
    return re.fullmatch(ID_PATTERN, value) is not None


Text = Annotated[str, AfterValidator(_storable)]  # text the job table stores and returns


class Strict(BaseModel):
    # NaN and infinities are refused in every float (JSON cannot carry them back).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Sampling(Strict):
    """Sampling parameters (vLLM's names). ``temperature=0`` is greedy."""

    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = Field(None, max_length=16)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(i < 0 for i in self.stop_token_ids or []):
            raise ValueError("stop_token_ids must be >= 0")
        return self


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=200_000)


class JobCreate(Strict):
    """One generation job: a prompt or chat messages, an adapter (None = base model)."""

    adapter: str | None = Field(None, pattern=NAME_PATTERN)
    prompt: Text | None = Field(None, min_length=1, max_length=200_000)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    sampling: Sampling = Sampling()
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    max_attempts: int = Field(3, ge=1, le=10)
    deadline_seconds: float | None = Field(None, gt=0, le=30 * 86400,
                                           description="expire if not finished within this")
    idempotency_key: Text | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class JobResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


class JobOut(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: str
    adapter: str | None
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


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None = None


class AdapterCreate(Strict):
    """Register an adapter: a local PEFT directory under an allowed root, or a Hub repo id."""

    name: str = Field(pattern=NAME_PATTERN)
    source: Text = Field(min_length=1, max_length=1024)
    revision: Text | None = Field(None, min_length=1, max_length=200)


class AdapterOut(BaseModel):
    object: Literal["adapter"] = "adapter"
    id: int
    name: str
    source: str
    revision: str | None = None
    rank: int | None = None
    status: str = "ready"
    shared: bool = False


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchOut(BaseModel):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str = "/v1/chat/completions"
    errors: dict[str, Any] | None = None
    input_file_id: str | None = None
    completion_window: str = "24h"
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, Any] | None = None
