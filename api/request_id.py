"""``x-request-id`` on every answer, as OpenAI's API sends one (the official SDKs show it as
``_request_id`` on what they return, for support and logs), and in the log line of a crash.

The id is always made here (``req_`` + 32 hex digits), never taken from the request: a
client's header could forge another request's id in the logs."""
from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class RequestId:
    """ASGI middleware: a new id per HTTP request, in ``request.state.request_id`` and in
    the answer's headers (also of refusals made by middleware inside it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)
