"""Checks on raw JSON bytes before anything parses them: valid UTF-8, a bounded nesting depth
(a deep document exhausts the parser's recursion), no NaN/Infinity (not JSON), and no lone
UTF-16 surrogate in any string (not Unicode text: no table stores it, no JSON encoder returns
it)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32  # a job body or batch line needs 4; OpenAI's deepest request bodies about 10

# A JSON string literal; an unterminated one runs to the end (so that no match ever fails:
# a failed match would be retried from every later quote, quadratic in hostile input).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_NON_FINITE = re.compile(rb"NaN|Infinity")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800 .. \udfff, maybe in a pair
# An integer of more digits than Python converts (sys.get_int_max_str_digits(), 4300): the
# parser raises, which FastAPI answered 400 "There was an error parsing the body" on routes
# documented to answer 422 (a hostile-tenant audit)
MAX_INT_DIGITS = 4300
# (each run tried from its first digit only: without the lookbehind a body of 4,300-digit
# runs was searched from every digit, quadratic: 2 s a MiB on the event loop, a review)
_LONG_DIGITS = re.compile(rb"(?<!\d)\d{%d}" % (MAX_INT_DIGITS + 1))
_LONG_INT = re.compile(rb"(?<![\d.eE+-])-?\d{%d,}(?![\d.eE])" % (MAX_INT_DIGITS + 1))


@dataclass(frozen=True)
class JsonProblem:
    """Why a document is refused: ``code`` (OpenAI-style), a message, the JSON path if any."""

    code: str
    message: str
    param: str | None = None


def too_deep(structure: bytes, limit: int) -> bool:
    """Whether JSON (with its string literals blanked, see ``_STRING``) nests arrays/objects
    deeper than ``limit``; a hostile document is walked only to its first level too deep."""
    brackets = structure.translate(None, _NOT_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False  # cannot nest deeper than it opens
    depth = 0
    for ch in brackets:
        if ch in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def is_text(value: str) -> bool:
    """Whether the string holds no lone surrogate (it encodes as UTF-8)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) of a parsed document holding a lone UTF-16
    surrogate, None when every string is Unicode text. ``""`` is the document itself."""
    if isinstance(value, str):
        return None if is_text(value) else path
    if isinstance(value, dict):
        for k, v in value.items():
            if not is_text(k):
                return _path(path, k.encode("utf-8", "backslashreplace").decode())
            found = lone_surrogate(v, _path(path, k))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate(v, _path(path, i))
            if found is not None:
                return found
    return None


def check_json(raw: bytes, max_depth: int = MAX_DEPTH) -> JsonProblem | None:
    """Why ``raw`` must not be parsed or stored, or None (it may still be invalid JSON: the
    parser reports that)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return JsonProblem("invalid_json", f"the JSON is not valid UTF-8 (byte 0x{raw[e.start]:02x}"
                                           f" at offset {e.start})")
    long_digits = _LONG_DIGITS.search(raw) is not None
    if (raw.count(b"[") + raw.count(b"{") <= max_depth and b"NaN" not in raw
            and b"Infinity" not in raw and not long_digits):
        structure = b""  # cannot nest too deep nor hold a non-finite number: skip the scan
    else:
        structure = _STRING.sub(b'""', raw)
    if structure and too_deep(structure, max_depth):
        return JsonProblem("json_too_deep", f"the JSON nests deeper than {max_depth} "
                                            f"level(s) of arrays/objects; at most {max_depth} "
                                            "are allowed")
    found = _NON_FINITE.search(structure) if structure else None
    if found:
        return JsonProblem("invalid_json", f"{found.group().decode()} is not a JSON number; "
                                           "numbers must be finite")
    if long_digits and _LONG_INT.search(structure):
        return JsonProblem("invalid_json", f"an integer of more than {MAX_INT_DIGITS} digits "
                                           "cannot be read")
    if _SURROGATE_ESCAPE.search(raw):  # rare: escaped pairs (emoji) are fine, lone ones not
        try:
            path = lone_surrogate(json.loads(raw))
        except (ValueError, RecursionError):
            return None
        if path is not None:
            where = path or "the document"
            return JsonProblem("invalid_text", f"{where} holds a lone UTF-16 surrogate "
                                               "(\\ud800-\\udfff without its pair), which is "
                                               "not Unicode text; send valid UTF-8",
                               param=path or None)
    return None
