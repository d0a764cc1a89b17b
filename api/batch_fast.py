"""The common batch line checked without pydantic: ``accept`` returns what ``BatchLine`` gives
for a line it can prove valid, None for anything else (pydantic then decides and words the
error, so a refused line's message never comes from here)."""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, NamedTuple

from annotated_types import Ge, Gt, Le, Lt, MaxLen

from lorry.api.json_check import is_text
from lorry.api.schemas import (
    MAX_CONTENT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOP_LOGPROBS,
    MAX_USER_CHARS,
    NAME_PATTERN,
    Message,
    OpenAIOptions,
)


class ParsedLine(NamedTuple):
    """A valid batch line: what the ingest keeps of it."""

    custom_id: str
    url: str
    model: str
    prompt: str | None
    messages: list[dict[str, str]] | None  # [{"role", "content"}]
    sampling: dict[str, Any]               # OpenAIOptions.sampling()


def _bounds(name: str) -> tuple[type, Any, bool, Any, bool] | None:
    """(int or float, low, low inclusive, high, high inclusive) of an optional number field
    of OpenAIOptions bounded only by ge/gt/le/lt, else None (left to pydantic)."""
    field = OpenAIOptions.model_fields[name]
    kind = {int | None: int, float | None: float}.get(field.annotation)
    if kind is None or not field.metadata:
        return None
    low = high = None
    low_inc = high_inc = True
    for m in field.metadata:
        if isinstance(m, Ge):
            low = m.ge
        elif isinstance(m, Gt):
            low, low_inc = m.gt, False
        elif isinstance(m, Le):
            high = m.le
        elif isinstance(m, Lt):
            high, high_inc = m.lt, False
        else:
            return None
    if low is None or high is None:
        return None
    return kind, low, low_inc, high, high_inc


_NUMBERS = {n: b for n in OpenAIOptions.model_fields if (b := _bounds(n)) is not None}
_OPTIONS = tuple(OpenAIOptions.model_fields)
_BODY_KEYS = frozenset({*_OPTIONS, "model", "messages", "prompt", "stream"})
_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
_URLS = ("/v1/chat/completions", "/v1/completions")
_NAME = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$")).fullmatch
_ROLES = frozenset(Message.model_fields["role"].annotation.__args__)
CUSTOM_ID_LENGTH = (1, 512)  # BatchLine.custom_id
PROMPT_LENGTH = (1, 200_000)  # RequestBody.prompt
MESSAGES_LENGTH = (1, 256)  # RequestBody.messages


def _max_length(model, name: str) -> int:
    return next(m.max_length for m in model.model_fields[name].metadata
                if isinstance(m, MaxLen))


_MAX_STOP_IDS = _max_length(OpenAIOptions, "stop_token_ids")


def _text(value: Any, longest: int | None, shortest: int = 0) -> bool:
    """Whether value is a string pydantic's ``Text`` of that length (characters) accepts."""
    if type(value) is not str or len(value) < shortest or "\x00" in value or (
            longest is not None and len(value) > longest):
        return False
    return is_text(value)


def _number(value: Any, bounds) -> Any:
    """The value as pydantic stores it (an int given for a float becomes one), or None."""
    kind, low, low_inc, high, high_inc = bounds
    if type(value) is not int and (kind is int or type(value) is not float):
        return None  # bools, strings and the like: pydantic's lax rules decide
    if (value < low if low_inc else value <= low) or (value > high if high_inc else
                                                      value >= high):
        return None
    return float(value) if kind is float else value


def _option(name: str, value: Any) -> Any:
    """A checked non-null option other than a bounded number, or _NO."""
    if name == "ignore_eos":
        return value if type(value) is bool else _NO
    if name == "logprobs":
        if type(value) is bool or type(value) is int and 0 <= value <= MAX_TOP_LOGPROBS:
            return value
        return _NO
    if name == "user":
        return value if _text(value, MAX_USER_CHARS) else _NO
    if name == "stop":
        if type(value) is str:
            return value if _text(value, MAX_STOP_CHARS, 1) else _NO
        if type(value) is list and len(value) <= MAX_STOPS and all(
                _text(s, MAX_STOP_CHARS, 1) for s in value):
            return value
        return _NO
    if name == "stop_token_ids":
        if type(value) is list and len(value) <= _MAX_STOP_IDS and all(
                type(i) is int and 0 <= i < 2**31 for i in value):   # TokenId
            return value
        return _NO
    return _NO  # response_format and anything new: pydantic


_NO = object()


def _messages(value: Any) -> list[dict[str, str]] | None:
    if type(value) is not list or not MESSAGES_LENGTH[0] <= len(value) <= MESSAGES_LENGTH[1]:
        return None
    out = []
    for m in value:
        if type(m) is not dict or len(m) != 2:
            return None
        role, content = m.get("role"), m.get("content")
        if type(role) is not str or role not in _ROLES or not _text(content, MAX_CONTENT_CHARS):
            return None
        out.append({"role": role, "content": content})
    return out


def accept(data: Any, samplings: dict | None = None) -> ParsedLine | None:
    """The line (parsed JSON) as BatchLine would give it, or None: not provably valid.
    ``samplings`` (kept across the lines of a file) maps the options given to their sampling
    dict: lines giving the same options share one dict (None: the options are unsupported)."""
    if type(data) is not dict or data.keys() != _LINE_KEYS:
        return None
    custom_id, url, body = data["custom_id"], data["url"], data["body"]
    if (type(data["method"]) is not str or data["method"] != "POST" or type(url) is not str
            or url not in _URLS or type(body) is not dict
            or not _text(custom_id, CUSTOM_ID_LENGTH[1], CUSTOM_ID_LENGTH[0])
            or not body.keys() <= _BODY_KEYS):
        return None
    model = body.get("model")
    if type(model) is not str or not _NAME(model):
        return None
    options = {}
    messages = prompt = None
    for name, value in body.items():
        if value is None or name == "model":
            continue
        if name == "messages":
            messages = _messages(value)
            if messages is None:
                return None
        elif name == "prompt":
            if not _text(value, PROMPT_LENGTH[1], PROMPT_LENGTH[0]):
                return None
            prompt = value
        elif name == "stream":
            if value is not False:
                return None
        elif name in _NUMBERS:
            number = _number(value, _NUMBERS[name])
            if number is None:
                return None
            options[name] = number
        else:
            checked = _option(name, value)
            if checked is _NO:
                return None
            options[name] = checked
    if (messages is None) == (prompt is None) or (messages is None) != (url == _URLS[1]):
        return None  # the url's input missing, or both given: pydantic words it
    # Keyed with each value's type (True and 1 are equal but ask for other logprobs) and
    # floats by their bits (-0.0 and 0.0 are equal).
    key = tuple((name, type(value), value.hex() if type(value) is float else value)
                for name, value in options.items())
    try:
        sampling = samplings[key] if samplings is not None else _sampling(options)
    except KeyError:
        sampling = samplings[key] = _sampling(options)
    except TypeError:  # a list given (stop, stop_token_ids): not shared
        sampling = _sampling(options)
    if sampling is None:
        return None
    return ParsedLine(custom_id, url, model, prompt, messages, sampling)


def _sampling(options: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAIOptions.sampling() of the checked options, None when they are unsupported."""
    view = SimpleNamespace(**{**dict.fromkeys(_OPTIONS), **options})
    if OpenAIOptions.unsupported(view) is not None:
        return None
    return OpenAIOptions.sampling(view)
