"""OpenAI Batch lines (JSONL) into job specs and per-line errors: shared by the REST route and
``lorry run`` (the embedded runner)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorry.api.json_check import check_json
from lorry.api.prompt_length import too_long_message
from lorry.api.schemas import MAX_TOKENS, NAME_PATTERN, Message, Text

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class RequestBody(BaseModel):
    """The ``body`` of one batch line: an OpenAI chat or text completion request."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(pattern=NAME_PATTERN)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    prompt: Text | None = Field(None, min_length=1, max_length=200_000)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = Field(None, max_length=16)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    n: Literal[1] | None = None
    stream: Literal[False] | None = None


class BatchLine(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    custom_id: Text = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: RequestBody

    @model_validator(mode="after")
    def _input_matches_url(self):
        chat = self.url == "/v1/chat/completions"
        if chat and self.body.messages is None:
            raise ValueError("a /v1/chat/completions line needs body.messages")
        if not chat and self.body.prompt is None:
            raise ValueError("a /v1/completions line needs body.prompt")
        if self.body.messages is not None and self.body.prompt is not None:
            raise ValueError("give body.messages or body.prompt, not both")
        return self


@dataclass
class ParsedBatch:
    lines: list[tuple[int, BatchLine]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # OpenAI {code, message, line}
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    endpoints: set[str] = field(default_factory=set)


def sampling_of(body: RequestBody) -> dict[str, Any]:
    """The job's sampling dict (engine names) from an OpenAI body; absent keys are left out."""
    out = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "seed", "stop",
                                         "stop_token_ids", "ignore_eos")
           if getattr(body, k) is not None}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


def _describe(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    value = first.get("input")
    shown = json.dumps(value)[:80] if isinstance(value, (str, int, float, bool)) else None
    msg = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'line'}: {e['msg']}"
                    for e in err.errors()[:3])
    if shown is not None:
        msg += f" (got {shown})"
    return msg, loc


def parse_lines(raw_lines: Iterable[tuple[int, bytes]]) -> ParsedBatch:
    """Validate each (line number, bytes) line; blank lines are skipped."""
    parsed = ParsedBatch()
    seen: dict[str, int] = {}
    for number, raw in raw_lines:
        if not raw.strip():
            continue
        problem = check_json(raw)
        if problem is not None:
            parsed.errors.append({"code": problem.code, "line": number, "param": problem.param,
                                  "message": f"line {number}: {problem.message}"})
            continue
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            parsed.errors.append({"code": "invalid_json", "line": number, "param": None,
                                  "message": f"line {number} is not valid JSON: {e}"})
            continue
        try:
            line = BatchLine.model_validate(data)
        except ValidationError as e:
            msg, loc = _describe(e)
            parsed.errors.append({"code": "invalid_request", "line": number, "param": loc or None,
                                  "message": f"line {number}: {msg}"})
            continue
        if line.custom_id in seen:
            parsed.duplicates.append({
                "code": "duplicate_custom_id", "line": number, "param": "custom_id",
                "message": f"line {number}: custom_id {line.custom_id!r} already used on line "
                           f"{seen[line.custom_id]}; custom_ids must be unique in a batch"})
            continue
        seen[line.custom_id] = number
        parsed.endpoints.add(line.url)
        parsed.lines.append((number, line))
    return parsed


BASE_ALIASES = ("base",)


def base_model_name(settings) -> str:
    return PurePath(settings.model.rstrip("/")).name


def specs_from_lines(parsed: ParsedBatch, queue, tenant, base_name: str, settings=None):
    """JobSpecs of the good lines; lines naming an unknown model or too long a prompt join
    ``parsed.errors`` (the length check needs ``settings``)."""
    from lorry.scheduler import JobSpec

    known: dict[str, bool] = {}
    specs = []
    for number, line in parsed.lines:
        model = line.body.model
        is_base = model == base_name or model in BASE_ALIASES
        if not is_base and model not in known:
            known[model] = queue.get_adapter(model, tenant.id) is not None
        if not is_base and not known[model]:
            parsed.errors.append({"code": "model_not_found", "line": number, "param": "body.model",
                                  "message": f"line {number}: unknown model {model!r}; use one of "
                                             f"your adapters or the base model {base_name!r}"})
            continue
        body = line.body
        contents = [m.content for m in body.messages] if body.messages else None
        too_long = None if settings is None else too_long_message(settings, body.prompt,
                                                                  contents)
        if too_long is not None:
            parsed.errors.append({"code": "context_length_exceeded", "line": number,
                                  "param": "body.messages" if contents else "body.prompt",
                                  "message": f"line {number}: {too_long}"})
            continue
        specs.append(JobSpec(adapter=None if is_base else model, prompt=body.prompt,
                             messages=[m.model_dump() for m in body.messages]
                             if body.messages else None,
                             sampling=sampling_of(body), custom_id=line.custom_id))
    return specs
