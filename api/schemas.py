"""Request and response bodies of the REST API (pydantic; unknown fields are refused)."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # job_<hex>, batch_<hex>: nothing else is looked up
# per-job ceiling; the API also refuses a named max_tokens that the context cannot hold after
# the prompt (api.prompt_length), and the engine ends a row at max_model_len
MAX_TOKENS = 4096


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


def text(min_length: int | None = None, max_length: int | None = None):
    """Text of that many characters. (A Field's length bounds on ``Text | None`` would be
    checked as a generic length: "at most N items" where characters are meant.)"""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length),
                     AfterValidator(_storable)]


MAX_STOPS, MAX_STOP_CHARS = 16, 1000        # stop strings a request, characters a string
MAX_CONTENT_CHARS = 200_000                 # a prompt, a chat message's content
MAX_USER_CHARS = 256
StopText = text(1, MAX_STOP_CHARS)
Stops = StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # a vocabulary index


def _whole(value: Any) -> Any:
    """A whole-number float (16.0, as Python's json.dumps and dataframe exports write ints)
    as the int it is, also in a list; anything else as given, for strict checking."""
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is list:
        return [int(v) if type(v) is float and v.is_integer() else v for v in value]
    return value


class Strict(BaseModel):
    # NaN and infinities are refused in every float (JSON cannot carry them back); strict:
    # true is no 1 and "5" no 5 (an int is still a float, and 16.0 an int: _whole)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class Sampling(Strict):
    """Sampling parameters (vLLM's names). ``temperature=0`` is greedy."""

    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's int64
    stop: Stops = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool = False

    _ints = field_validator("max_tokens", "top_k", "seed", "stop_token_ids",
                            mode="before")(_whole)

    @model_validator(mode="after")
    def _stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return self


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: text(max_length=MAX_CONTENT_CHARS)


class JobCreate(Strict):
    """One generation job: a prompt or chat messages, an adapter (None = base model)."""

    adapter: str | None = Field(None, pattern=NAME_PATTERN)
    prompt: text(1, MAX_CONTENT_CHARS) | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    sampling: Sampling = Sampling()
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    max_attempts: int = Field(3, ge=1, le=10)
    deadline_seconds: float | None = Field(None, gt=0, le=30 * 86400,
                                           description="expire if not finished within this")
    idempotency_key: text(1, 200) | None = None

    _ints = field_validator("priority", "max_attempts", mode="before")(_whole)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0   # prompt tokens served from the engine's prefix cache


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class JobResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    # per generated token when asked: {"id", "token", "logprob", "top": [[id, token, logprob]]}
    logprobs: list[dict[str, Any]] | None = None


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
    cancel_requested: bool = False  # a cancel was asked while it ran (on its way if running)


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None = None


class AdapterCreate(Strict):
    """Register an adapter: a local PEFT directory under an allowed root, or a Hub repo id."""

    name: str = Field(pattern=NAME_PATTERN)
    source: Text = Field(min_length=1, max_length=1024)
    revision: text(1, 200) | None = None


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


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0   # input tokens served from the engine's prefix cache


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """OpenAI's Batch.usage: the succeeded requests' tokens; cached_tokens: those of the
    input tokens served from the prefix cache (0 for batches finalized before migration 0009).
    Lorry counts no reasoning tokens apart: 0."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


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
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, Any] | None = None
    # the base model's name (a line's "model" may name an adapter of it); usage once finalized
    model: str | None = None
    usage: BatchUsage | None = None


BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


METADATA_RULE = ("metadata must be a JSON object of at most 16 keys of at most 64 characters "
                 "(none starting with 'lorry_', which Lorry keeps for itself) with string "
                 "values of at most 512 characters")


def metadata_ok(meta: Any) -> bool:
    """Whether a batch's metadata keeps METADATA_RULE (OpenAI's limits, one reserved prefix:
    older batches stored Lorry's own entries there, which are never shown)."""
    return isinstance(meta, dict) and len(meta) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
        and not k.startswith("lorry_") for k, v in meta.items())


WINDOW_PATTERN = r"^[1-9][0-9]{0,3}h$"
MAX_WINDOW_HOURS = 24 * 7  # scheduler.batches.window_seconds' limit


def check_window(value: str) -> str:
    """A completion_window (of WINDOW_PATTERN's form) of at most a week."""
    if int(value[:-1]) > MAX_WINDOW_HOURS:
        raise ValueError(f"completion_window must be 1h to {MAX_WINDOW_HOURS}h, like '24h'; "
                         f"got {value!r}")
    return value


EXPIRY_SECONDS = (3600, 2_592_000)   # OpenAI's expires_after: one hour to 30 days


class ExpiresAfter(Strict):
    """OpenAI's expiration policy of a file: deleted ``seconds`` after its creation."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRY_SECONDS[0], le=EXPIRY_SECONDS[1])


class BatchCreate(Strict):
    """OpenAI's batch creation body: the uploaded JSONL file (purpose "batch") and the one
    endpoint all its lines use; ``output_expires_after``: its output and error files expire."""

    input_file_id: str = Field(pattern=ID_PATTERN)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = Field("24h", pattern=WINDOW_PATTERN)
    metadata: dict[str, Text] | None = Field(None, max_length=16)
    output_expires_after: ExpiresAfter | None = None

    _window = field_validator("completion_window")(check_window)

    @field_validator("metadata")
    @classmethod
    def _metadata_values(cls, value):
        if value is not None and not metadata_ok(value):
            raise ValueError(METADATA_RULE)
        return value


class BatchList(BaseModel):
    """A page of batches (OpenAI's cursor page: pass ``last_id`` as ``after``)."""

    object: Literal["list"] = "list"
    data: list[BatchOut]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileOut(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ModelOut(BaseModel):
    """OpenAI's Model object: the base model (owned_by "lorry") or an adapter ("shared" or
    the tenant's name)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


# ---- OpenAI-compatible completions (/v1/chat/completions, /v1/completions, batch lines) ------

MAX_TOP_LOGPROBS = 20


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description='only "text" is supported')


class OpenAIOptions(BaseModel):
    """The sampling fields of OpenAI's chat and text completion requests (plus vLLM's
    ``top_k``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # as Strict's
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's int64
    stop: Stops = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="chat: true/false; completions: how many top tokens (0..20)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="chat: top tokens per position (needs logprobs)")
    n: int | None = Field(None, ge=1, le=128, description="only 1 is supported")
    user: text(max_length=MAX_USER_CHARS) | None = Field(None,
                                                          description="accepted and ignored")
    response_format: ResponseFormat | None = None

    _ints = field_validator("max_tokens", "max_completion_tokens", "top_k", "seed",
                            "stop_token_ids", "logprobs", "top_logprobs", "n",
                            mode="before")(_whole)

    def unsupported(self) -> tuple[str, str] | None:
        """(message, param) of a valid but unsupported option, or None."""
        if self.n is not None and self.n != 1:
            why = (f"n={self.n} is not supported: Lorry returns one completion per request "
                   "(n=1); send n requests instead")
            return why, "n"
        if self.response_format is not None and self.response_format.type != "text":
            why = (f"response_format type {self.response_format.type!r} is not supported; "
                   "only {'type': 'text'}")
            return why, "response_format"
        if self.top_logprobs is not None and self.logprobs is not True:
            return "top_logprobs needs logprobs=true", "top_logprobs"
        if getattr(self, "stream_options", None) is not None and not getattr(self, "stream",
                                                                             False):
            return "stream_options is only allowed with stream=true", "stream_options"
        return None

    def sampling(self) -> dict[str, Any]:
        """The job's sampling dict (engine names); absent options are left out."""
        out = {k: getattr(self, k) for k in (
            "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
            "presence_penalty", "frequency_penalty", "repetition_penalty")
            if getattr(self, k) is not None}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            out["max_tokens"] = max_tokens
        if self.logprobs is True:
            out["logprobs"] = self.top_logprobs or 0
        elif self.logprobs is not None and self.logprobs is not False:
            out["logprobs"] = self.logprobs
        return out


class TextPart(Strict):
    type: Literal["text"]
    text: text(max_length=MAX_CONTENT_CHARS)


MAX_PARTS = 1000  # text parts of one message


class ChatMessage(Strict):
    """A chat message: text content, or a list of text parts (joined)."""

    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ... are not used
    role: Literal["system", "developer", "user", "assistant"]
    content: text(max_length=MAX_CONTENT_CHARS) | Annotated[
        list[TextPart], Field(min_length=1, max_length=MAX_PARTS)]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIOptions):
    """OpenAI's chat completion request; ``model`` is an adapter name or the base model."""

    model: str = Field(pattern=NAME_PATTERN)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool | None = False  # OpenAI's null is not streamed, as false
    stream_options: StreamOptions | None = None
    # accepted and ignored, as vLLM does: every job is stored anyway (GET /v1/jobs/{id}),
    # and there is one service tier
    store: bool | None = None
    metadata: dict[Annotated[str, Field(max_length=64)],
                   Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None


class CompletionRequest(OpenAIOptions):
    """OpenAI's (legacy) text completion request; ``model`` as for chat."""

    model: str = Field(pattern=NAME_PATTERN)
    prompt: text(1, MAX_CONTENT_CHARS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionOut(BaseModel):
    """OpenAI's chat.completion object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class CompletionOut(BaseModel):
    """OpenAI's text_completion object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
