"""The Python client: submit jobs and batches to a Lorry server over HTTP and wait for results."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from lorry.errors import InvalidRequest, LorryError, Unavailable, WaitTimeout, error_for
from lorry.models import (
    Adapter,
    AdapterPage,
    Batch,
    BatchPage,
    BatchResultLine,
    File,
    Job,
    JobPage,
)

LAST_POLL_S = 2.0   # the least time a wait's poll may take, however near its deadline
MIN_POLL_S = 0.05   # the shortest pause between a wait's polls
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "stop_token_ids", "ignore_eos")


def _seg(value: str) -> str:
    """An id or name as one path segment ('../x' cannot reach another route)."""
    if not isinstance(value, str) or not value:
        raise LorryError(0, f"an id or name must be a non-empty string, got {value!r}")
    return quote(value, safe="")


class Client:
    """A tenant's handle on a Lorry server.

    Parameters
    ----------
    base_url : str
        e.g. ``http://127.0.0.1:8000``.
    api_key : str
        The tenant's key (``lorry tenant create`` prints it once).
    timeout : float
        Per-request HTTP timeout in seconds.

    Examples
    --------
    >>> c = Client("http://127.0.0.1:8000", "lorry_...")              # doctest: +SKIP
    >>> job = c.submit("Say hi", adapter="uppercase", max_tokens=16)  # doctest: +SKIP
    >>> c.wait(job.id).text                                          # doctest: +SKIP
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 http_client: httpx.Client | None = None):
        # http_client: a ready httpx.Client (e.g. FastAPI's TestClient) instead of a new one.
        if not isinstance(api_key, str) or not api_key.strip() or not api_key.isprintable():
            raise ValueError("api_key must be a tenant's API key ('lorry_...', printed by "
                             "`lorry tenant create`), got an empty or unprintable value")
        if http_client is None and not (isinstance(base_url, str)
                                        and base_url.startswith(("http://", "https://"))):
            shown = base_url.rsplit("@", 1)[-1] if isinstance(base_url, str) else base_url
            raise ValueError(f"base_url must start with http:// or https:// (e.g. "
                             f"'http://127.0.0.1:8000'), got {shown!r}")  # no user:password
        self._http = http_client or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._own_http = http_client is None  # a given client keeps its own timeouts
        self._http.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- HTTP ---------------------------------------------------------------------------------
    def _where(self) -> str:
        """The base URL without any user:password in it (error messages get printed)."""
        u = self._http.base_url
        return f"{u.scheme}://{u.host}{f':{u.port}' if u.port else ''}{u.path}".rstrip("/")

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        if "json" in kw:
            _check_finite(kw["json"])
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise LorryError(0, f"cannot reach {self._where()}: {type(e).__name__}: "
                                f"{str(e).replace(str(self._http.base_url), self._where())}"
                             ) from None
        if resp.status_code >= 400:
            self._raise_for(resp)
        if resp.status_code >= 300:
            raise LorryError(resp.status_code, f"{method} {path} was redirected (HTTP "
                                               f"{resp.status_code}): is {self._where()} the "
                                               "Lorry API's root URL?")
        return resp

    def _within(self, left: float | None) -> dict:
        """``timeout=`` of a wait's poll with ``left`` seconds to its deadline: at most the
        client's own timeouts, at least LAST_POLL_S (a last poll answered a little late still
        returns the job it finds done); none when ``left`` is None (the client's own)."""
        if left is None or not self._own_http:
            return {}
        left, t = max(left, LAST_POLL_S), self._http.timeout
        return {"timeout": httpx.Timeout(**{k: left if v is None else min(v, left)
                                            for k, v in t.as_dict().items()})}

    def _json(self, resp: httpx.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise LorryError(resp.status_code, self._unexpected(resp)) from None

    def _as(self, model, resp: httpx.Response):
        """The answer as ``model``; a LorryError if it is not one (another server answered)."""
        try:
            return model.model_validate(self._json(resp))
        except ValueError:  # pydantic's ValidationError
            raise LorryError(resp.status_code, self._unexpected(resp)) from None

    def _unexpected(self, resp: httpx.Response) -> str:
        return (f"{resp.request.method} {resp.request.url.path} answered HTTP "
                f"{resp.status_code} with no Lorry API object (content-type "
                f"{resp.headers.get('content-type', 'none')!r}): is {self._where()} the Lorry "
                "API's root URL?")

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, prompt: str | None = None, *, adapter: str | None = None,
               messages: list[dict] | None = None, priority: int = 0,
               idempotency_key: str | None = None, max_attempts: int | None = None,
               **sampling: Any) -> Job:
        """Queue one generation job; sampling keys are vLLM's (max_tokens, temperature, ...)."""
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; "
                            f"allowed {list(SAMPLING_KEYS)}")
        body: dict[str, Any] = {"adapter": adapter, "priority": priority, "sampling": sampling}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = messages
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        return self._as(Job, self._request("POST", "/v1/jobs", json=body))

    def get(self, job_id: str) -> Job:
        return self._as(Job, self._request("GET", f"/v1/jobs/{_seg(job_id)}"))

    def cancel(self, job_id: str) -> Job:
        return self._as(Job, self._request("POST", f"/v1/jobs/{_seg(job_id)}/cancel"))

    def list(self, *, status: str | None = None, adapter: str | None = None,
             batch_id: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """All matching jobs, following the cursor page by page."""
        cursor = None
        while True:
            params = {k: v for k, v in (("status", status), ("adapter", adapter),
                                        ("batch_id", batch_id), ("limit", page_size),
                                        ("after", cursor)) if v is not None}
            page = self._as(JobPage, self._request("GET", "/v1/jobs", params=params))
            yield from page.data
            if not page.has_more or not page.next_cursor:
                return
            cursor = page.next_cursor

    def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.2,
             max_interval: float = 5.0, progress: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is final (succeeded/failed/cancelled/expired), backing off;
        ``progress`` is called with the job after each poll."""
        path = f"/v1/jobs/{_seg(job_id)}"
        return _poll(lambda left: self._as(Job, self._request("GET", path,
                                                              **self._within(left))),
                     timeout, poll_interval, max_interval, job_id, progress)

    # -- batches ------------------------------------------------------------------------------
    def submit_batch(self, source: str | Path | Iterable[dict], *,
                     metadata: dict | None = None, completion_window: str = "24h",
                     idempotency_key: str | None = None) -> Batch:
        """Upload an OpenAI Batch JSONL file (a path) or records (dicts, one per line) and
        create its batch in one request. Lines that cannot be queued are in the batch's
        ``errors`` (``Batch.line_errors``) and later in its error file."""
        if isinstance(source, (str, Path)):
            content = Path(source).read_bytes()
        else:
            content = "".join(json.dumps(r) + "\n" for r in source).encode()
        params = {"completion_window": completion_window}
        if metadata:
            params["metadata"] = json.dumps(metadata)
        headers = {"Content-Type": "application/jsonl"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        resp = self._request("POST", "/v1/batches", params=params, content=content,
                             headers=headers)
        return self._as(Batch, resp)

    def upload_file(self, source: str | Path | bytes, *, filename: str | None = None,
                    idempotency_key: str | None = None) -> File:
        """Upload a batch input file (purpose "batch"), as OpenAI's ``files.create``."""
        if isinstance(source, bytes):
            name, handle = filename or "batch.jsonl", source
        else:
            name, handle = filename or Path(source).name, open(source, "rb")  # noqa: SIM115
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        try:
            resp = self._request("POST", "/v1/files", files={"file": (name, handle)},
                                 data={"purpose": "batch"}, headers=headers)
        finally:
            if not isinstance(handle, bytes):
                handle.close()
        return self._as(File, resp)

    def create_batch(self, input_file_id: str, *, endpoint: str = "/v1/chat/completions",
                     completion_window: str = "24h", metadata: dict | None = None,
                     idempotency_key: str | None = None) -> Batch:
        """A batch of an uploaded file, as OpenAI's ``batches.create``."""
        body = {"input_file_id": input_file_id, "endpoint": endpoint,
                "completion_window": completion_window, "metadata": metadata}
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        return self._as(Batch, self._request("POST", "/v1/batches", json=body,
                                             headers=headers))

    def file(self, file_id: str) -> File:
        return self._as(File, self._request("GET", f"/v1/files/{_seg(file_id)}"))

    def delete_file(self, file_id: str) -> None:
        """Delete one of your files and its bytes, as OpenAI's ``files.delete``."""
        self._request("DELETE", f"/v1/files/{_seg(file_id)}")

    def file_content(self, file_id: str) -> Iterator[bytes]:
        """A file's bytes (a batch's output_file_id / error_file_id too), streamed."""
        try:
            with self._http.stream("GET", f"/v1/files/{_seg(file_id)}/content") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                yield from resp.iter_bytes()
        except httpx.HTTPError as e:
            raise LorryError(0, f"cannot reach {self._where()}: {type(e).__name__}") from None

    def batches(self, *, page_size: int = 100) -> Iterator[Batch]:
        """The tenant's batches, newest first, following the cursor page by page."""
        after = None
        while True:
            params = {"limit": page_size} | ({"after": after} if after else {})
            page = self._as(BatchPage, self._request("GET", "/v1/batches", params=params))
            yield from page.data
            if not page.has_more or not page.last_id:
                return
            after = page.last_id

    def batch(self, batch_id: str) -> Batch:
        return self._as(Batch, self._request("GET", f"/v1/batches/{_seg(batch_id)}"))

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._as(Batch, self._request("POST", f"/v1/batches/{_seg(batch_id)}/cancel"))

    def wait_batch(self, batch_id: str, *, timeout: float | None = None,
                   poll_interval: float = 0.5, max_interval: float = 10.0,
                   progress: Callable[[Batch], None] | None = None) -> Batch:
        """Poll until the batch is final; ``progress`` is called with the batch after each
        poll (its ``request_counts`` say how far it is)."""
        path = f"/v1/batches/{_seg(batch_id)}"
        return _poll(lambda left: self._as(Batch, self._request("GET", path,
                                                                **self._within(left))),
                     timeout, poll_interval, max_interval, batch_id, progress)

    def iter_results(self, batch_id: str, *, errors: bool = False) -> Iterator[BatchResultLine]:
        """The batch's results so far, streamed from its jobs: succeeded requests (or, with
        ``errors``, failed, cancelled and expired ones; refused input lines are in
        ``Batch.line_errors`` and in the batch's error file)."""
        path = f"/v1/batches/{_seg(batch_id)}/{'errors' if errors else 'output'}"
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                for line in resp.iter_lines():
                    if line.strip():
                        try:
                            yield BatchResultLine.model_validate_json(line)
                        except ValueError:
                            raise LorryError(resp.status_code, self._unexpected(resp)) from None
        except httpx.HTTPError as e:
            raise LorryError(0, f"cannot reach {self._where()}: {type(e).__name__}") from None

    def _raise_for(self, resp: httpx.Response) -> None:
        try:
            body = resp.json()
        except ValueError:
            body = None
        detail = body.get("error", body.get("detail")) if isinstance(body, dict) else resp.text
        raise error_for(resp.status_code, _describe(detail), detail,
                        _retry_after(resp.headers.get("retry-after")))

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, source: str, *, revision: str | None = None) -> Adapter:
        body = {"name": name, "source": source, "revision": revision}
        return self._as(Adapter, self._request("POST", "/v1/adapters", json=body))

    def adapters(self) -> list[Adapter]:
        return self._as(AdapterPage, self._request("GET", "/v1/adapters")).data

    def delete_adapter(self, name: str) -> None:
        self._request("DELETE", f"/v1/adapters/{_seg(name)}")


def _poll(fetch, timeout, interval, max_interval, what, progress=None):
    """``fetch(http_timeout)`` until the object is final; each request ends by the deadline
    (a server that stops answering is a WaitTimeout then, not a hang)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = max(interval, MIN_POLL_S)   # 0 would poll without a pause, and stay 0
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            obj = fetch(left)
        except Unavailable as e:  # the server's database is away for a moment: keep waiting
            obj, pause_for = None, e.retry_after or interval
        except LorryError as e:
            if e.status or deadline is None or time.monotonic() < deadline:
                raise
            raise WaitTimeout(0, f"{what} is unknown after {timeout} s (the server did not "
                                 f"answer: {e.message})") from None
        else:
            if progress is not None:
                progress(obj)
            if obj.done:
                return obj
            pause_for = interval
        if deadline is not None and time.monotonic() >= deadline:
            state = f"still {obj.status!r}" if obj is not None else "unknown (server unavailable)"
            raise WaitTimeout(0, f"{what} is {state} after {timeout} s")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        time.sleep(pause_for if left is None else min(pause_for, left))
        interval = min(max_interval, interval * 1.5)


def _check_finite(value, where: str = "") -> None:
    """Refuse NaN and infinities before sending (JSON has no such numbers), naming the field
    as the server's ``finite_number`` error does."""
    if isinstance(value, float) and not math.isfinite(value):
        message = f"{where or 'body'}: Input should be a finite number (got {value})"
        raise InvalidRequest(0, message, {"message": message, "type": "invalid_request_error",
                                          "param": where or None, "code": "finite_number"})
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        _check_finite(item, f"{where}[{key}]" if isinstance(key, int) else
                      f"{where}.{key}" if where else str(key))


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (the HTTP-date form is not used by Lorry)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _describe(detail) -> str:
    """A one-line message from an error body: Lorry's ``{"message", ...}`` (OpenAI's shape),
    or FastAPI's ``detail`` (a string or a list of field errors) from other servers."""
    if isinstance(detail, dict):
        message = str(detail.get("message") or json.dumps(detail))
        lines = detail.get("lines")
        if isinstance(lines, list) and lines:
            shown = [_line_error(e) for e in lines[:5] if isinstance(e, dict)]
            more = f"; and {len(lines) - 5} more" if len(lines) > 5 else ""
            message += " [" + "; ".join(shown) + more + "]"
        return message
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(x) for x in err.get("loc", []) if x != "body")
                msg = err.get("msg") or err.get("message")
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def _line_error(err: dict) -> str:
    """A refused batch line as one phrase: its custom_id (when it had one) and its reason."""
    who = f"custom_id {err['custom_id']!r}: " if err.get("custom_id") else ""
    return who + str(err.get("message") or err.get("code"))
