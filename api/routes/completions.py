"""OpenAI's synchronous ``/v1/chat/completions`` and ``/v1/completions``: each request is a job
in the interactive priority class; the call waits for its result, or with ``stream=true``
answers server-sent events with the text the worker publishes to Redis step by step."""
from __future__ import annotations

import json
import logging
import time

import anyio
from anyio.to_thread import run_sync
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from lorry.api.batch_input import base_model_name, is_base, with_chat_default
from lorry.api.deps import get_queue, get_settings, get_tenant, nudge
from lorry.api.errors import NO_RETRY, ApiError, ErrorBody, error_body, responses
from lorry.api.openai_format import ChunkWriter, completion_object, usage_of
from lorry.api.prompt_length import check_prompt_length
from lorry.api.schemas import (
    ChatCompletionOut,
    ChatCompletionRequest,
    CompletionOut,
    CompletionRequest,
)
from lorry.api.tenant_slots import tenant_slots
from lorry.scheduler import errors
from lorry.scheduler.policy import INTERACTIVE_PRIORITY
from lorry.scheduler.types import is_adapter_failure

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

# the channel workers publish a streaming job's text to (lorry.workers.tokens.stream_channel)
STREAM_CHANNEL = "{prefix}:stream:{job_id}"
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
POLL_MAX_S = 0.25   # longest pause between reads of a waited-for job
STREAM_POLL_S = 0.5  # a streaming answer also reads its job this often (lost pieces, failures)

ERRORS = {
    **responses(404, 413),
    429: {"model": ErrorBody, "description": "the tenant's max_queued quota is full "
                                             "(`quota_exceeded`), or it has "
                                             "LORRY_MAX_OPEN_COMPLETIONS completions open "
                                             "across the API processes "
                                             "(`too_many_open_completions`); "
                                             "retry after `Retry-After` seconds"},
    400: {"model": ErrorBody, "description": "the request is invalid (`param` names the field, "
                                             "`code` the rule), or asks for an option Lorry "
                                             "does not support (`unsupported_value`: n > 1, "
                                             "response_format other than text, top_logprobs "
                                             "without logprobs, stream_options without "
                                             "stream), or its adapter could not be loaded "
                                             "(`adapter_unloadable`: the message says why; "
                                             "`x-should-retry: false`)"},
    409: {"model": ErrorBody, "description": "the job was cancelled (`job_cancelled`)"},
    500: {"model": ErrorBody, "description": "the job failed (`job_failed`; the message says "
                                             "why); `x-should-retry: false`"},
    504: {"model": ErrorBody, "description": "no result within LORRY_SYNC_TIMEOUT_SECONDS "
                                             "(`timeout`): the job keeps running; poll "
                                             "GET /v1/jobs/{id} (the message and the "
                                             "`x-lorry-job-id` header name it)"},
}
STREAM_DOC = {"description": "the completion object, or with `stream=true` server-sent events "
                             "(`data: {chunk}` ... `data: [DONE]`); an error after the stream "
                             "began is one `data: {\"error\": {...}}` event",
              "content": {"text/event-stream": {}}}


@router.post("/chat/completions", response_model=ChatCompletionOut,
             summary="Chat completion (OpenAI), synchronous or streamed",
             responses={200: STREAM_DOC, **ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response,
                           tenant=Depends(get_tenant), queue=Depends(get_queue),
                           settings=Depends(get_settings)):
    messages = [m.plain() for m in body.messages]
    return await _answer(request, response, body, tenant, queue, settings, chat=True,
                         prompt=None, messages=messages)


@router.post("/completions", response_model=CompletionOut,
             summary="Text completion (OpenAI), synchronous or streamed",
             responses={200: STREAM_DOC, **ERRORS})
async def completions(body: CompletionRequest, request: Request, response: Response,
                      tenant=Depends(get_tenant), queue=Depends(get_queue),
                      settings=Depends(get_settings)):
    return await _answer(request, response, body, tenant, queue, settings, chat=False,
                         prompt=body.prompt, messages=None)


def resolve_model(queue, tenant, settings, model: str) -> str | None:
    """The adapter ``model`` names (None: the base model); 404 naming what exists."""
    base = base_model_name(settings)
    if is_base(model, base):
        return None
    if queue.get_adapter(model, tenant.id) is not None:
        return model
    known = sorted({a.name for a in queue.list_adapters(tenant.id)})  # own shadows shared
    raise ApiError(404, f"the model {model!r} does not exist or you cannot use it; use the "
                        f"base model {base!r} or one of your adapters: {known}",
                   code="model_not_found", param="model")


async def _answer(request, response, body, tenant, queue, settings, *, chat, prompt, messages):
    problem = body.unsupported()
    if problem is not None:
        raise ApiError(400, problem[0], code="unsupported_value", param=problem[1])
    opened = tenant_slots(request, "completions")
    token = await opened.enter(tenant.id, settings.max_open_completions,
                               settings.sync_timeout_seconds + 60)
    streaming = False
    try:
        answer = await _answer_one(request, response, body, tenant, queue, settings, chat=chat,
                                   prompt=prompt, messages=messages,
                                   on_close=lambda: opened.leave(tenant.id, token))
        streaming = isinstance(answer, StreamingResponse)
        return answer
    finally:
        if not streaming:  # a stream leaves when its events end
            await opened.leave(tenant.id, token)


async def _answer_one(request, response, body, tenant, queue, settings, *, chat, prompt,
                      messages, on_close):
    from lorry.scheduler import JobSpec

    adapter = await run_sync(resolve_model, queue, tenant, settings, body.model)
    sampling = body.sampling()
    # tokenizing a long prompt takes a while: off the event loop, as the queue's calls
    await run_sync(check_prompt_length, settings, prompt,
                   [m["content"] for m in messages] if messages else None,
                   sampling.get("max_tokens"), "max_completion_tokens"
                   if body.max_completion_tokens else "max_tokens")
    if chat:
        sampling = with_chat_default(sampling, settings)
    spec = JobSpec(adapter=adapter, prompt=prompt, messages=messages, sampling={
        **sampling, **({"stream": True} if body.stream else {})},
        priority=INTERACTIVE_PRIORITY)  # claimed before bulk work (fair share among tenants)
    [info] = await run_sync(queue.submit, tenant.id, [spec])
    job = _Job(info.id, request, queue, tenant, settings.sync_timeout_seconds)
    if body.stream:
        subscription = await _subscribe(settings, info.id)
        await run_sync(nudge, request, 1)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        began: list = []
        events = _events(job, subscription, ChunkWriter(info.id, body.model, chat),
                         logprobs="logprobs" in spec.sampling, usage=usage, began=began)
        return _EventStream(events, began, job, subscription, on_close,
                            media_type="text/event-stream",
                            headers={"x-lorry-job-id": info.id, "Cache-Control": "no-cache"})
    await run_sync(nudge, request, 1)
    response.headers["x-lorry-job-id"] = info.id
    done = await job.wait(watch_client=True)
    if done is None:  # the client went away: its job is cancelled, nobody reads this
        return Response(status_code=499)
    return completion_object(done, body.model, chat)


class _EventStream(StreamingResponse):
    """The SSE answer; when it ends however it ends, the tenant's open-completions slot is
    given back, and a stream whose events never began (the client left before the first
    byte) cancels its job, as a stream the client leaves does."""

    def __init__(self, events, began: list, job, subscription, on_close, **kw):
        super().__init__(events, **kw)
        self._began, self._job, self._on_close = began, job, on_close
        self._subscription = subscription

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
            if not self._began:  # _events never ran: its own ending did not either
                await _Stream(self._job, self._subscription, None).close()


class _Job:
    """The job behind one request: read it, wait for it, cancel it, explain its end."""

    def __init__(self, job_id: str, request: Request, queue, tenant, timeout: float):
        self.id, self.request, self.queue, self.tenant = job_id, request, queue, tenant
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.status = None   # as last read (None: never read)

    async def read(self):
        """The job's row; None while the database cannot be read. The job is queued already:
        a 503 now would make the SDKs, which retry 503s, submit it a second time."""
        try:
            info = await run_sync(self.queue.get_job, self.id, self.tenant.id)
            if info is not None:
                self.status = info.status
            return info
        except (errors.Unavailable, errors.Retryable) as e:
            log.warning("cannot read %s while waiting for it (reading again): %s", self.id, e)
            return None

    async def cancel(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await run_sync(self.queue.cancel, self.id, self.tenant.id)
            except Exception as e:  # noqa: BLE001 - the job then runs to its end
                log.warning("could not cancel %s after its client left: %s", self.id, e)

    def timed_out(self) -> ApiError:
        why = ("; no worker took it: are the GPU workers running, and can they and this API "
               "reach their broker (LORRY_BROKER_URL)?") if self.status == "queued" else ""
        return ApiError(504, f"job {self.id} did not finish within {self.timeout:g} s "
                             f"(LORRY_SYNC_TIMEOUT_SECONDS){why}; it stays queued or running: "
                             f"poll GET /v1/jobs/{self.id} for its result", code="timeout",
                        headers={**NO_RETRY, "x-lorry-job-id": self.id})

    def ended(self, info) -> ApiError:
        """The error of a job that ended without a result to answer."""
        headers = {**NO_RETRY, "x-lorry-job-id": self.id}
        if info.status == "cancelled" or (info.result and info.result.finish_reason == "abort"):
            return ApiError(409, f"job {self.id} was cancelled", code="job_cancelled",
                            headers=headers)
        why = info.error or f"it ended with status {info.status!r}"
        if is_adapter_failure(info.error):   # the tenant's adapter, not the service
            return ApiError(422, f"job {self.id} failed: {why}", code="adapter_unloadable",
                            param="model", headers=headers)
        return ApiError(500, f"job {self.id} failed: {why}", code="job_failed", headers=headers)

    async def wait(self, watch_client: bool = False):
        """The succeeded job (an ApiError for any other end, or past the deadline); None when
        ``watch_client`` and the client disconnected (the job is then cancelled)."""
        pause = 0.02
        while True:
            info = await self.read()
            if info is not None and info.status in TERMINAL:
                if info.status != "succeeded" or info.result.finish_reason == "abort":
                    raise self.ended(info)
                return info
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self.timed_out()
            if watch_client and await self.request.is_disconnected():
                await self.cancel()
                return None
            await anyio.sleep(min(pause, left))
            pause = min(pause * 1.5, POLL_MAX_S)


async def _subscribe(settings, job_id: str):
    """A pub/sub subscription to the job's streamed text, or None when Redis cannot be reached
    (then the answer comes as one chunk when the job is done)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.broker_url, socket_connect_timeout=2,
                                     socket_timeout=5)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(STREAM_CHANNEL.format(prefix=settings.redis_prefix,
                                                     job_id=job_id))
    except Exception as e:  # noqa: BLE001 - stream from the job table instead
        log.warning("cannot subscribe to the streamed text of %s: %s", job_id, e)
        await client.aclose()
        return None
    return client, pubsub


async def _events(job: _Job, subscription, w: ChunkWriter, *, logprobs: bool, usage: bool,
                  began: list | None = None):
    """SSE of one streamed answer. Pieces carry their character offset, so a piece sent twice
    (or again by a retried run) adds nothing; what pub/sub lost is taken from the stored
    result at the end. A client that disconnects cancels the job."""
    if began is not None:
        began.append(True)
    stream = _Stream(job, subscription, w)
    try:
        if w.chat:
            yield w.chunk("", role=True)
        while stream.reason is None and not stream.finished:
            for event in await stream.poll():
                yield event
        if not stream.finished:
            for event in await stream.ending(logprobs=logprobs, usage=usage):
                yield event
            stream.finished = True
    finally:
        await stream.close()


class _Stream:
    """One streamed answer's progress: the characters sent, the job's last read, its finish
    reason once every character is sent, and whether the client was told how it ended (a
    stream closed before that cancels the job)."""

    def __init__(self, job: _Job, subscription, w: ChunkWriter):
        self.job, self.subscription, self.w = job, subscription, w
        self.sent = 0
        self.info = None  # the job's row once it has ended
        self.reason: str | None = None
        self.finished = False
        self.next_read = time.monotonic() + STREAM_POLL_S

    def error(self, status: int, detail: str, code: str | None) -> str:
        """The one error event that ends the stream (the job is not cancelled)."""
        self.finished = True
        return self.w.error(error_body(status, detail, code=code))

    async def poll(self) -> list[str]:
        """One turn: a published piece, or every STREAM_POLL_S the job's row; its events."""
        if time.monotonic() >= self.job.deadline:  # the job keeps running: the error names it
            return [self.error(504, self.job.timed_out().detail, "timeout")]
        message = await self._message()
        if message is not None and message.get("type") == "message":
            return self._published(json.loads(message["data"]))
        if time.monotonic() >= self.next_read:
            return await self._read_row()
        return []

    async def _message(self):
        if self.subscription is None:
            await anyio.sleep(0.1)
            return None
        try:
            return await self.subscription[1].get_message(ignore_subscribe_messages=True,
                                                          timeout=0.25)
        except Exception as e:  # noqa: BLE001 - Redis went away: the stream goes on from the
            # job's row (read every STREAM_POLL_S), the rest of its text when it has ended
            log.warning("the streamed text of %s is read from the job table from here: Redis "
                        "cannot be reached (%s)", self.job.id, type(e).__name__)
            lost, self.subscription = self.subscription, None
            with anyio.CancelScope(shield=True):
                try:
                    await lost[0].aclose()
                except Exception:  # noqa: BLE001 - its connection is gone anyway
                    pass
            return None

    def _published(self, data: dict) -> list[str]:
        """A piece the worker published: the characters not sent yet."""
        start, text = data["offset"], data["text"]
        events = []
        if start <= self.sent < start + len(text):
            events.append(self.w.chunk(text[self.sent - start:]))
            self.sent = start + len(text)
        if data["finish_reason"] is not None:
            if start + len(text) == self.sent and data["finish_reason"] != "error":
                self.reason = data["finish_reason"]
            else:  # pieces were lost, or the job failed: its row has the rest or the error
                self.next_read = 0.0
        return events

    async def _read_row(self) -> list[str]:
        """The job's row: once it has ended, the rest of its text or its error."""
        self.next_read = time.monotonic() + STREAM_POLL_S
        info = await self.job.read()
        if info is None or info.status not in TERMINAL:
            return []
        self.info = info  # the ended job's row (a running one's has no result for the end)
        if info.status != "succeeded":
            err = self.job.ended(info)
            return [self.error(err.status_code, err.detail, err.code)]
        events = []
        if len(info.result.text) > self.sent:
            events.append(self.w.chunk(info.result.text[self.sent:]))
            self.sent = len(info.result.text)
        self.reason = info.result.finish_reason
        return events

    async def ending(self, *, logprobs: bool, usage: bool) -> list[str]:
        """The last chunk (finish reason, logprobs), the usage chunk, [DONE]; or the error
        event of a cancelled or failed job."""
        if self.reason == "abort":
            return [self.error(409, f"job {self.job.id} was cancelled", "job_cancelled")]
        info = self.info
        if (logprobs or usage) and info is None:
            try:
                info = await self.job.wait()
            except ApiError as e:
                return [self.error(e.status_code, e.detail, e.code)]
        events = [self.w.chunk(None, self.reason,
                               logprobs=info.result.logprobs if logprobs else None)]
        if usage:
            events.append(self.w.usage(usage_of(info.result)))
        return [*events, self.w.done()]

    async def close(self) -> None:
        """Drop the subscription; cancel the job unless the client was told how it ended."""
        if self.subscription is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self.subscription[1].aclose()
                    await self.subscription[0].aclose()
                except Exception as e:  # noqa: BLE001 - the connection is dropped anyway
                    log.debug("closing the stream subscription of %s: %s", self.job.id, e)
        if not self.finished:
            await self.job.cancel()
