"""The body guard before any route: no body is read on /v1 without a bearer key, and a body
that stops coming ends 408 (a hostile-tenant audit: a client that sent one chunk and stopped
held its connection for ever, 150 of them 180 MB of the API's memory)."""
from __future__ import annotations

import json

import anyio
import pytest
from fastapi import FastAPI, Request

from lorry.api import errors
from lorry.api.body_guard import BodyGuard


async def _route(scope, receive, send):   # stands for the app: reads the body, answers 200
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(guard, path, headers, chunks, *, stall=False, method="POST"):
    """Run one request through ``guard``; chunks are sent, then (stall) nothing ever again.
    -> (status, JSON body or bytes, how many receive() calls the guard made)."""
    sent, calls = [], [0]

    async def receive():
        calls[0] += 1
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk,
                    "more_body": bool(chunks) or stall}
        if stall:
            await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [
        (k.lower().encode(), v.encode()) for k, v in headers.items()], "query_string": b""}

    async def main():
        with anyio.fail_after(10):
            await guard(scope, receive, send)
    anyio.run(main)
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        return status, json.loads(body), calls[0]
    except ValueError:
        return status, body, calls[0]


def _guard(**kw):
    return BodyGuard(_route, max_body_bytes=1 << 20, max_json_bytes=4096, **kw)


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer  ", "Basic dXNlcjpwdw==",
                                  "bearer"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches", "/v1/files",
                                  "/v1/chat/completions"])
def test_no_byte_of_a_body_is_read_without_a_bearer_key(path, auth):
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["authorization"] = auth
    status, body, calls = _call(_guard(), path, headers, [b'{"prompt": "x"'], stall=True)
    assert status == 401 and calls == 0
    assert body["error"]["code"] == "missing_api_key"
    assert body["error"]["type"] == "authentication_error"


def test_a_body_that_stops_coming_is_408_and_one_that_comes_is_handed_on():
    headers = {"authorization": "Bearer k", "content-type": "application/json"}
    status, body, _ = _call(_guard(idle_seconds=0.2), "/v1/jobs", headers,
                            [b'{"prompt": ', b'"x"'], stall=True)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert "no byte of the request body came for 0.2 s" in body["error"]["message"]
    status, body, _ = _call(_guard(idle_seconds=0.2), "/v1/jobs", headers,
                            [b'{"prompt": ', b'"x"}'])
    assert (status, body) == (200, {"prompt": "x"})


def test_a_streamed_upload_that_stops_coming_is_408():
    app = FastAPI()

    @app.post("/v1/batches")
    async def upload(request: Request):
        async for _ in request.stream():
            pass
        return {"ok": True}
    errors.install(app)
    guard = BodyGuard(app, max_body_bytes=1 << 20, max_json_bytes=4096, idle_seconds=0.2)
    status, body, _ = _call(guard, "/v1/batches", {"authorization": "Bearer k"},
                            [b'{"custom_id": "a"}\n'], stall=True)
    assert status == 408 and body["error"]["code"] == "request_timeout"


def test_routes_outside_v1_and_reads_need_no_key_here():
    """The guard refuses only bodies it would read: reads and routes outside /v1 go on to
    the app (whose routes ask for the key themselves)."""
    assert _call(_guard(), "/healthz", {}, [b""])[0] == 200
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        assert _call(_guard(), "/v1/jobs", {}, [b""], method=method)[0] == 200
