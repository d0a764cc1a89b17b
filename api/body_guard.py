"""Request bodies checked before any route reads them: a bearer key before any byte is read
on /v1, the size limit (declared or streamed), a body that stops coming, and, for JSON
bodies, the raw checks of ``api.json_check`` (UTF-8, depth, NaN, surrogates)."""
from __future__ import annotations

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorry.api.deps import bears_a_key, missing_key
from lorry.api.errors import ApiError, error_response, status_for
from lorry.api.json_check import check_json

# on an answer given before the body was read: the server closes the connection after it
# (the body's rest could not be told from the next request)
CLOSE = {"Connection": "close"}


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON (without one it does not:
    the body then fails validation as a whole)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


class BodyGuard:
    """ASGI middleware: 413 past the limit, 422 for JSON that must not be parsed; the body
    of an accepted request is handed on unchanged.

    Parameters
    ----------
    app : ASGI app
    max_body_bytes : int
        Limit of the streamed uploads (``streamed_paths``); ``api.upload`` counts them as
        they are read, line by line.
    max_json_bytes : int
        Limit of every other body, read whole here before the route sees it.
    idle_seconds : float
        A body of which no byte comes for this long is answered 408 and its connection
        closed (a client that sent one chunk and stopped held its connection, and the part
        it had sent, for ever: a hostile-tenant audit).
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_bytes: int,
                 idle_seconds: float = 30.0,
                 streamed_paths: tuple[str, ...] = ("/v1/batches", "/v1/files")):
        self.app, self.max_body_bytes, self.max_json_bytes = app, max_body_bytes, max_json_bytes
        self.idle_seconds, self.streamed_paths = idle_seconds, streamed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        streamed = scope["path"] in self.streamed_paths
        limit = self.max_body_bytes if streamed else self.max_json_bytes
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            await error_response(413, f"request body of {size} bytes exceeds the limit of "
                                      f"{limit} bytes")(scope, receive, send)
            return
        if scope["path"].startswith("/v1/") and scope["method"] in ("POST", "PUT", "PATCH") \
                and not bears_a_key(headers.get("authorization")):
            # every /v1 route wants a key: no byte of a body is read (or kept) without one
            e = missing_key()
            await error_response(e.status_code, e.detail, code=e.code,
                                 headers={**e.headers, **CLOSE})(scope, receive, send)
            return
        patient = _patient(receive, self.idle_seconds)
        if streamed:
            await self.app(scope, _counted(patient, limit), send)
            return
        body, more = bytearray(), True
        while more:
            try:
                message = await patient()
            except ApiError as e:   # no byte for idle_seconds
                await error_response(e.status_code, e.detail, headers=e.headers)(
                    scope, receive, send)
                return
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await error_response(413, f"request body exceeds the limit of {limit} bytes"
                                     )(scope, receive, send)
                return
        if body and is_json(headers.get("content-type")):
            problem = check_json(bytes(body))
            if problem is not None:
                await error_response(status_for(scope["path"], 422),
                                     f"the body is refused: {problem.message}",
                                     code=problem.code, param=problem.param)(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body once, then what the client sends next (disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def _patient(receive: Receive, idle: float) -> Receive:
    """A receive that raises 408 when no byte of the body comes for ``idle`` seconds."""
    async def patient() -> Message:
        try:
            with anyio.fail_after(idle):
                return await receive()
        except TimeoutError:
            raise ApiError(408, f"no byte of the request body came for {idle:g} s "
                                "(LORRY_BODY_IDLE_SECONDS): the request is dropped; send it "
                                "again", headers=CLOSE) from None
    return patient


def _counted(receive: Receive, limit: int) -> Receive:
    """A receive that raises 413 once the body passes ``limit`` bytes (a streamed body may
    declare no length; the route's reader stops there)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        return message
    return counted
