"""The one error shape of every route, OpenAI's: ``{"error": {"message", "type", "param",
"code"}}``, and the exception handlers that produce it (status codes are kept)."""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorry.scheduler import errors

log = logging.getLogger(__name__)
RETRY_AFTER_UNAVAILABLE_S = 5  # the database is usually back within seconds (a restart)
RETRY_AFTER_QUOTA_S = 30
NO_RETRY = {"x-should-retry": "false"}  # the official SDKs retry 409, 429 and 5xx otherwise

# ``type`` by status, and the ``code`` an error gets when whoever raised it named none.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
         409: "conflict_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable_error"}
CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found",
         405: "method_not_allowed", 408: "request_timeout", 409: "conflict",
         413: "request_too_large",
         422: "invalid_request", 429: "quota_exceeded", 503: "service_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    lines: list[dict[str, Any]] | None = None  # batch uploads: one {line, code, param, message}


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's)."""

    error: ErrorDetail


DESCRIPTIONS = {
    400: "the request cannot be served as sent (e.g. a file purpose other than 'batch', a "
         "multipart part missing); on OpenAI's routes also an invalid request (as OpenAI "
         "answers it; `param` names the field, `code` the rule); the message says what is "
         "allowed",
    401: "missing or invalid API key (`WWW-Authenticate: Bearer`)",
    403: "not allowed",
    404: "no such object of yours (other tenants' objects are 404 too); on /metrics: no "
         "metrics token is configured",
    408: "the request body stopped coming: no byte of it for `LORRY_BODY_IDLE_SECONDS`",
    409: "the name is already taken, or another request stored the same key first",
    413: "the body, a line or the number of lines exceeds a limit (the message names it)",
    422: "the request is invalid (Lorry's own routes; OpenAI's answer 400); `param` names "
         "the field, `code` the rule",
    429: "the tenant's max_queued quota is full; retry after `Retry-After` seconds",
    503: "the job database cannot be reached (or aborted the request on a conflict with "
         "another); retry after `Retry-After` seconds",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the ``ErrorBody`` schema."""
    return {s: {"model": ErrorBody, "description": DESCRIPTIONS[s]} for s in statuses}


class ApiError(StarletteHTTPException):
    """An HTTP error with OpenAI's ``code`` and ``param`` (and per-line errors of a batch)."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, lines: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers=headers)
        self.code, self.param, self.lines = code, param, lines


def _text(value: str) -> str:
    """A message as valid Unicode: a lone surrogate is shown as its escape (``\\ud800``)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               lines: list[dict] | None = None) -> dict[str, Any]:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    detail: dict[str, Any] = {"message": _text(message), "type": kind, "param": param,
                              "code": code if code is not None else CODES.get(status)}
    if lines:
        detail["lines"] = json.loads(_text(json.dumps(lines, default=str)))
    return {"error": detail}


def error_response(status: int, message: str, *, code: str | None = None,
                   param: str | None = None, lines: list[dict] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code, param=param, lines=lines),
                        status_code=status, headers=headers)


def _shown(value: Any) -> str | None:
    """A short input worth echoing in a message (never a whole prompt), as JSON-ish text."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str) and len(value) <= 80:
        return _text(json.dumps(value, ensure_ascii=False))
    return None


def loc_text(loc: tuple | list, request: bool = True) -> str:
    """``("body", "sampling", "stop", 0)`` -> ``sampling.stop[0]``; query/path: the name
    (``request`` False: a loc inside a model of its own, e.g. a batch line, taken whole)."""
    parts = list(loc[1:]) if request and loc and loc[0] in ("body", "query", "path",
                                                            "header") else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# the names pydantic gives a union's plain members in a loc (others: "list[...]" and the like)
_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "constrained-str",
                          "constrained-int", "constrained-float", "constrained-list"})


def _in_body(loc: tuple, body: Any) -> tuple[tuple, bool]:
    """(the loc's parts that name keys and positions of ``body``, whether others were left
    out): pydantic puts a union member's name ("function-after[_storable(), str]",
    "list[TextPart]") in the loc where a value failed every member; such a part names nothing
    in the request. A part past the body's depth (an unknown field's name) is kept."""
    kept, value, dropped = [], body, False
    for part in loc:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif isinstance(part, str) and ("[" in part or part in _MEMBER_TAGS):
            dropped = True   # not a key of the request here: a union member's name
            continue
        else:
            value = None
        kept.append(part)
    return tuple(kept), dropped


def field_errors(items: list[dict], body: Any = None, prefixed: bool = True) -> list[dict]:
    """pydantic's errors with each loc as a path into ``body`` (the request as parsed; with
    ``prefixed``, FastAPI's locs, which start with "body"); where an input failed every
    member of a union, a member's "not of my type" error goes when another member took the
    input and refused it deeper or for another reason (a list of 17 stop strings: "at most
    16 items", not also "not a valid string")."""
    out = []
    for e in items:
        loc = tuple(e.get("loc", ()))
        if prefixed and loc[:1] == ("body",):
            rest, member = _in_body(loc[1:], body)
            clean = ("body", *rest)
        else:
            clean, member = _in_body(loc, body)
        out.append(({**e, "loc": clean}, member))

    def wrong_type(e: dict) -> bool:
        return str(e.get("type", "")).endswith("_type")

    kept = [e for e, member in out if not (member and wrong_type(e) and any(
        o is not e and o["loc"][:len(e["loc"])] == e["loc"]
        and not (o["loc"] == e["loc"] and wrong_type(o)) for o, _ in out))]
    return kept or [e for e, _ in out]


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) of FastAPI's validation errors: each field with its reason."""
    items = field_errors(list(exc.errors()), getattr(exc, "body", None))
    parts = []
    for e in items[:5]:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "JSON decode error")
            at = e["loc"][1] if len(e.get("loc", ())) > 1 else "?"
            parts.append(f"the body is not valid JSON: {reason} (at character {at})")
            continue
        where = loc_text(e.get("loc", ())) or "body"
        text = f"{where}: {e.get('msg')}"
        shown = _shown(e.get("input"))
        if shown is not None and e.get("type") != "missing":
            text += f" (got {shown})"
        parts.append(text)
    if len(items) > 5:
        parts.append(f"and {len(items) - 5} more")
    first = items[0] if items else {}
    param = None if first.get("type") == "json_invalid" else (
        loc_text(first.get("loc", ())) or None)
    return "; ".join(parts) or "invalid request", param, first.get("type")


def queue_error_status(exc: errors.QueueError) -> tuple[int, str, dict[str, str] | None]:
    """(status, code, headers) of a refusal by the job queue, by its type (the queue
    converts driver errors into these types: no driver error reaches the API)."""
    if isinstance(exc, (errors.Unavailable, errors.Retryable)):  # ConnectionLost included
        return 503, "database_unavailable", {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
    if isinstance(exc, errors.DuplicateKey):
        return 409, "conflict", None
    if isinstance(exc, errors.QuotaExceeded):
        if exc.never_fits:   # retrying cannot help: the SDKs must not (x-should-retry)
            return 429, "quota_exceeded", dict(NO_RETRY)
        return 429, "quota_exceeded", {"Retry-After": str(RETRY_AFTER_QUOTA_S)}
    if isinstance(exc, errors.AdapterLimit):   # deleting adapters helps, waiting does not
        return 429, "adapter_quota_exceeded", dict(NO_RETRY)
    if isinstance(exc, errors.StorageFull):   # deleting files helps, waiting does not
        return 413, "storage_quota_exceeded", dict(NO_RETRY)
    if isinstance(exc, errors.AdapterExists):   # the SDKs retry 409s: no use here
        return 409, "adapter_exists", dict(NO_RETRY)
    if isinstance(exc, errors.UnknownAdapter):
        return 422, "unknown_adapter", None
    if isinstance(exc, errors.UnknownTenant):
        return 422, "unknown_tenant", None
    return 422, "invalid_request", None


# OpenAI's routes: an invalid request is 400 there, as OpenAI and vLLM answer it (the SDKs
# raise BadRequestError, which OpenAI code catches); Lorry's own routes keep FastAPI's 422
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/files", "/v1/batches",
                "/v1/models")


def status_for(path: str, status: int) -> int:
    """The status an error answer has on the route of ``path`` (422 is 400 on OpenAI's)."""
    return 400 if status == 422 and path.startswith(OPENAI_PATHS) else status


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one shape."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        lines = getattr(exc, "lines", None)
        if isinstance(detail, list):  # per-line errors of a batch upload
            lines, detail = detail, "; ".join(str(d.get("message", d)) if isinstance(d, dict)
                                              else str(d) for d in detail[:5])
        return error_response(status_for(request.url.path, exc.status_code), str(detail),
                              code=getattr(exc, "code", None),
                              param=getattr(exc, "param", None), lines=lines,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param, code = validation_message(exc)
        return error_response(status_for(request.url.path, 422), message, code=code,
                              param=param)

    @app.exception_handler(errors.QueueError)
    async def _refused(request: Request, exc: errors.QueueError):
        status, code, headers = queue_error_status(exc)
        return error_response(status_for(request.url.path, status), str(exc), code=code,
                              headers=headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        # Starlette re-raises it after this answer, so the server logs the traceback; this
        # answer is sent outside the request-id middleware, so it names the id itself
        rid = getattr(request.state, "request_id", None)
        log.error("internal error answering %s %s (x-request-id %s)", request.method,
                  request.url.path, rid)
        # and once it is re-raised the server drops the connection: say so, or a client's
        # next request on it meets a reset (the SDKs then resend it, POSTs too)
        return error_response(500, "internal server error", code="internal_error",
                              headers={"Connection": "close",
                                       **({"x-request-id": rid} if rid else {})})
