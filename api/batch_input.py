"""OpenAI Batch lines (JSONL) into job specs and per-line errors: shared by the REST route and
``lorry run`` (the embedded runner)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorry.api.batch_fast import (
    CUSTOM_ID_LENGTH,
    MESSAGES_LENGTH,
    PROMPT_LENGTH,
    ParsedLine,
    accept,
)
from lorry.api.errors import field_errors, loc_text
from lorry.api.json_check import check_json
from lorry.api.prompt_length import too_long_messages
from lorry.api.schemas import (
    MAX_TOKENS,
    NAME_PATTERN,
    ChatMessage,
    OpenAIOptions,
    Text,
    text,
)
from lorry.scheduler.types import JobSpec, LineError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class RequestBody(OpenAIOptions):
    """The ``body`` of one batch line: an OpenAI chat or text completion request."""

    model: str = Field(pattern=NAME_PATTERN)
    messages: list[ChatMessage] | None = Field(None, min_length=MESSAGES_LENGTH[0],
                                               max_length=MESSAGES_LENGTH[1])
    prompt: text(*PROMPT_LENGTH) | None = None
    stream: Literal[False] | None = None

    @model_validator(mode="after")
    def _supported(self):
        problem = self.unsupported()
        if problem is not None:
            raise ValueError(problem[0])
        return self


class BatchLine(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    custom_id: Text = Field(min_length=CUSTOM_ID_LENGTH[0], max_length=CUSTOM_ID_LENGTH[1])
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


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                 "ignore_eos")
BASE_ALIASES = ("base",)
CHUNK_LINES = 2000  # lines parsed, checked and queued together (memory stays flat)
UTF8_BOM = b"\xef\xbb\xbf"


def base_model_name(settings) -> str:
    return PurePath(settings.model.rstrip("/")).name


def is_base(model: str, base_name: str) -> bool:
    """Whether a model name means the base model on the OpenAI routes and in batch lines:
    "base" or the base model's directory name (``base_model_name``)."""
    return model in BASE_ALIASES or model == base_name


def chat_max_tokens(settings) -> int:
    """max_tokens of a chat request that names none (nor max_completion_tokens): as long as
    the context allows, as OpenAI's and vLLM's chat routes answer (the engine ends the row at
    max_model_len, finish reason "length"), at most MAX_TOKENS. Text completions keep
    OpenAI's default (the engine's 16)."""
    limit = getattr(settings, "max_model_len", None)
    return min(MAX_TOKENS, limit) if limit else MAX_TOKENS


def with_chat_default(sampling: dict[str, Any], settings) -> dict[str, Any]:
    """A chat request's sampling with ``chat_max_tokens`` where it names no max_tokens."""
    if "max_tokens" in sampling:
        return sampling
    return {**sampling, "max_tokens": chat_max_tokens(settings)}


def names_the_base(name: str, settings) -> bool:
    """``is_base`` for these settings: an adapter of such a name could not be reached on
    the OpenAI routes, so none is registered under it."""
    return is_base(name, base_model_name(settings))


def sampling_of(body: RequestBody) -> dict[str, Any]:
    """The job's sampling dict (engine names) from an OpenAI body; absent keys are left out."""
    return body.sampling()


def _describe(err: ValidationError, data: Any) -> tuple[str, str]:
    items = field_errors(list(err.errors()), data, prefixed=False)
    loc = loc_text(items[0]["loc"], request=False)
    parts = []
    for e in items[:3]:  # each error with the value it is about (not the first's after all)
        value = e.get("input")
        shown = json.dumps(value)[:80] if isinstance(value, (str, int, float, bool)) else None
        parts.append(f"{loc_text(e['loc'], request=False) or 'line'}: {e['msg']}"
                     + (f" (got {shown})" if shown is not None else ""))
    return "; ".join(parts), loc


class DuplicateCustomId(ValueError):
    """A custom_id used twice in one batch file: the whole batch is refused (``errors``:
    one ``{line, code, param, message}`` per repeat)."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["message"])
        self.errors = errors


def _custom_id(data: Any) -> str | None:
    """The custom_id of a refused line, when it has a storable one."""
    cid = data.get("custom_id") if isinstance(data, dict) else None
    if isinstance(cid, str) and 0 < len(cid) <= 512 and "\x00" not in cid:
        try:
            cid.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return cid
    return None


def parse_line(number: int, raw: bytes) -> BatchLine | LineError:
    """One batch line, validated by pydantic, or why it is refused."""
    problem = check_json(raw)
    if problem is not None:
        return LineError(number, problem.code, f"line {number}: {problem.message}",
                         problem.param)
    try:
        return BatchLine.model_validate_json(raw)
    except ValidationError as e:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as bad:
            return LineError(number, "invalid_json", f"line {number} is not valid JSON: {bad}")
        msg, loc = _describe(e, data)
        return LineError(number, "invalid_request", f"line {number}: {msg}", loc or None,
                         _custom_id(data))


def read_line(number: int, raw: bytes, samplings: dict | None = None) -> ParsedLine | LineError:
    """One batch line, validated, or why it is refused (``parse_line``'s answer): the common
    line is checked by ``batch_fast.accept`` (a few times cheaper; ``samplings``: its memo
    for a file's lines), any other by pydantic."""
    if check_json(raw) is None:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            data = None
        parsed = accept(data, samplings)
        if parsed is not None:
            return parsed
    return read_line_with_pydantic(number, raw)


def read_line_with_pydantic(number: int, raw: bytes) -> ParsedLine | LineError:
    """``parse_line``'s answer in the shape the ingest keeps (the path for every line the
    fast check does not take, and the reference it is tested against)."""
    line = parse_line(number, raw)
    if isinstance(line, LineError):
        return line
    body = line.body
    return ParsedLine(line.custom_id, line.url, body.model, body.prompt,
                      [m.plain() for m in body.messages]
                      if body.messages else None, sampling_of(body))


@dataclass
class IngestStats:
    """What ingest_chunks saw: lines accepted and refused, the endpoints of accepted lines."""

    accepted: int = 0
    rejected: int = 0
    endpoints: set[str] = field(default_factory=set)
    refused: list[LineError] = field(default_factory=list)  # the first KEPT_REFUSED

    KEPT_REFUSED = 1000



def _url_of(data: bytes) -> str | None:
    """The ``url`` of a raw line that is a JSON object with a string url, else None."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):   # json_too_deep lines too
        return None
    url = obj.get("url") if isinstance(obj, dict) else None
    return url if isinstance(url, str) else None

class _Chunker:
    def __init__(self, queue, tenant, base_name: str, settings, endpoint: str | None):
        self.queue, self.tenant, self.base_name = queue, tenant, base_name
        self.settings, self.endpoint = settings, endpoint
        self.seen: dict[str, int] = {}
        # Looked up once, before the batch's transaction (on SQLite a second connection
        # would wait for that transaction's lock).
        self.known = {a.name for a in queue.list_adapters(tenant.id) if a.status == "ready"}
        self.samplings: dict[tuple, dict] = {}  # equal sampling dicts shared (one JSON each)
        self.kept: set[int] = set()  # ids of the dicts in samplings (alive: ids unique)
        self.options: dict = {}  # batch_fast.accept's memo

    def _model_ok(self, model: str) -> bool:
        return is_base(model, self.base_name) or model in self.known

    def chunk(self, raw: list[tuple[int, bytes]],
              stats: IngestStats) -> tuple[list[JobSpec], list[LineError]]:
        refused: list[LineError] = []
        good: list[tuple[int, ParsedLine]] = []
        duplicates: list[dict[str, Any]] = []
        for number, data in raw:
            line = self._check(number, data, duplicates)
            if isinstance(line, LineError):
                refused.append(line)
            elif line is not None:
                good.append((number, line))
        if duplicates:
            raise DuplicateCustomId(duplicates)
        specs = self._specs(good, refused, stats)
        refused.sort(key=lambda e: e.line)
        stats.accepted += len(specs)
        stats.rejected += len(refused)
        stats.refused += refused[:max(0, stats.KEPT_REFUSED - len(stats.refused))]
        return specs, refused

    def _check(self, number: int, data: bytes | None,
               duplicates: list[dict[str, Any]]) -> ParsedLine | LineError | None:
        """One line read and checked against the batch: the line, why it is refused, or None
        for a repeated custom_id (added to ``duplicates``)."""
        if data is None:
            limit = getattr(self.settings, "max_line_bytes", None)
            return LineError(number, "line_too_large", f"line {number} is longer than the "
                             f"limit of {limit} bytes; shorten it")
        line = read_line(number, data, self.options)
        # a refused line keeps its custom_id in the error file: it counts as a use too
        cid = line.custom_id
        if cid is not None and cid in self.seen:
            duplicates.append({
                "code": "duplicate_custom_id", "line": number, "param": "custom_id",
                "message": f"line {number}: custom_id {cid!r} already used on line "
                           f"{self.seen[cid]}; custom_ids must be unique in a batch"})
            return None
        if cid is not None:
            self.seen[cid] = number
        if isinstance(line, LineError):
            # a chat body under the other endpoint's url: the url is what is wrong, not the
            # body the url asks for (read again only for refused lines)
            url = _url_of(data) if self.endpoint is not None else None
            return line if url is None or url == self.endpoint else self._wrong_url(
                number, url, cid)
        if self.endpoint is not None and line.url != self.endpoint:
            return self._wrong_url(number, line.url, cid)
        if not self._model_ok(line.model):
            return LineError(
                number, "model_not_found", f"line {number}: unknown model {line.model!r}; use "
                f"one of your adapters or the base model {self.base_name!r}", "body.model", cid)
        return line

    def _wrong_url(self, number: int, url: str, cid: str | None) -> LineError:
        return LineError(number, "invalid_url", f"line {number}: url {url!r} differs from the "
                         f"batch's endpoint {self.endpoint!r}; every line must use the "
                         "batch's endpoint", "url", cid)

    def _specs(self, good: list[tuple[int, ParsedLine]], refused: list[LineError],
               stats: IngestStats) -> list[JobSpec]:
        """JobSpecs of the checked lines; a prompt too long for the model goes to ``refused``."""
        items = [(line.prompt, [m["content"] for m in line.messages] if line.messages
                  else None) for _, line in good]
        wants = [line.sampling.get("max_tokens") for _, line in good]
        too_long = [None] * len(good) if self.settings is None else too_long_messages(
            self.settings, items, wants)
        specs, chat_samplings = [], {}
        for (number, line), problem in zip(good, too_long):
            if problem is not None:   # (reason, field); max_tokens also for
                reason, field = problem   # max_completion_tokens (the line keeps one)
                refused.append(LineError(number, "context_length_exceeded",
                                         f"line {number}: {reason}", f"body.{field}",
                                         line.custom_id))
                continue
            sampling = line.sampling if line.messages is None else self._chat(
                line.sampling, chat_samplings)
            specs.append(JobSpec(
                adapter=None if is_base(line.model, self.base_name) else line.model,
                prompt=line.prompt, messages=line.messages, sampling=self._shared(sampling),
                custom_id=line.custom_id))
            stats.endpoints.add(line.url)
        return specs

    def _chat(self, sampling: dict, memo: dict[int, tuple[dict, dict]]) -> dict:
        """``with_chat_default`` of a chat line's sampling: one dict per source dict of a
        chunk (lines share their source dicts; the source is kept beside its id)."""
        if "max_tokens" in sampling:
            return sampling
        source, chat = memo.get(id(sampling), (None, None))
        if source is not sampling:
            chat = with_chat_default(sampling, self.settings)
            memo[id(sampling)] = (sampling, chat)
        return chat

    def _shared(self, sampling: dict) -> dict:
        """The one kept dict equal to ``sampling`` (equal dicts are stored as one JSON)."""
        if id(sampling) not in self.kept:
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                               for k, v in sampling.items()))
            sampling = self.samplings.setdefault(key, sampling)
            self.kept.add(id(sampling))
        return sampling


def ingest_chunks(raw_lines: Iterable[tuple[int, bytes | None]], queue, tenant, base_name: str,
                  settings=None, *, endpoint: str | None = None,
                  stats: IngestStats | None = None,
                  chunk_lines: int = CHUNK_LINES
                  ) -> Iterator[tuple[list[JobSpec], list[LineError]]]:
    """(accepted JobSpecs, refused lines) per ``chunk_lines`` lines of a batch file, read
    lazily (``JobQueue.ingest_batch`` takes them). Blank lines are skipped; a line given as
    None (longer than the limit, see ``api.upload.file_lines``), a line naming an
    unknown model, another url than ``endpoint``, or too long a prompt (checked when
    ``settings`` is given) is refused with its custom_id. Raises DuplicateCustomId."""
    stats = stats if stats is not None else IngestStats()
    return _chunks(raw_lines, _Chunker(queue, tenant, base_name, settings, endpoint), stats,
                   chunk_lines)


def _chunks(raw_lines, chunker: _Chunker, stats: IngestStats, chunk_lines: int):
    pending: list[tuple[int, bytes]] = []
    for number, raw in raw_lines:
        if number == 1 and raw is not None and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]  # the file's byte order mark (Windows tools write one)
        if raw is not None and not raw.strip():
            continue
        pending.append((number, raw))
        if len(pending) >= chunk_lines:
            yield chunker.chunk(pending, stats)
            pending = []
    if pending:
        yield chunker.chunk(pending, stats)


def line_error_dict(e: LineError) -> dict[str, Any]:
    """A refused line as the API and ``lorry run`` show it (OpenAI's BatchError + custom_id)."""
    return {"code": e.code, "line": e.line, "param": e.param, "message": e.message,
            "custom_id": e.custom_id}
