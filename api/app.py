"""The FastAPI application: tenants' REST API over the job queue (never imports torch)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from lorry.api.metrics import make_registry
from lorry.api.routes import adapters, batches, health, jobs
from lorry.scheduler import errors
from lorry.scheduler.errors import QueueError

log = logging.getLogger(__name__)
DESCRIPTION = """Submit generation jobs for many LoRA adapters of one base model, as durable
asynchronous jobs. Authenticate with `Authorization: Bearer <tenant API key>`."""


def create_app(settings=None, queue=None, nudger="auto", redis_client="auto") -> FastAPI:
    """Build the app.

    Parameters
    ----------
    settings : lorry.settings.Settings, optional
        Defaults to the environment's settings.
    queue : scheduler.JobQueue, optional
        Defaults to ``JobQueue(settings.database_url)``.
    nudger : callable or None or "auto"
        Called after submissions to wake workers; "auto" nudges Celery through Redis.
    redis_client : redis.Redis or None or "auto"
        Where workers publish their figures for ``/metrics``.
    """
    if settings is None:
        from lorry.settings import get_settings

        settings = get_settings()
    if queue is None:
        from lorry.scheduler import JobQueue

        queue = JobQueue(settings.database_url)
    if nudger == "auto":
        from lorry.api.nudge import DrainNudger

        nudger = DrainNudger(settings.broker_url, settings.redis_prefix, settings.nudge_ttl_seconds)
    if redis_client == "auto":
        import redis

        redis_client = redis.Redis.from_url(settings.broker_url, socket_timeout=2,
                                            socket_connect_timeout=2)
    app = FastAPI(title="Lorry", version="0.1.0", description=DESCRIPTION)
    app.state.settings, app.state.queue, app.state.nudger = settings, queue, nudger
    app.state.registry, app.state.submitted = make_registry(queue, redis_client,
                                                            settings.redis_prefix)
    for module in (jobs, batches, adapters, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        # Batch uploads are counted while streamed (api.upload); other bodies are small JSON.
        limit = settings.max_body_bytes if request.url.path == "/v1/batches" \
            else settings.max_line_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            return JSONResponse({"detail": f"request body of {size} bytes exceeds the limit of "
                                           f"{limit} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI's body, but only scalar inputs are echoed (an input may be a whole prompt).
        errors = []
        for e in exc.errors():
            item = {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            value = e.get("input")
            short = isinstance(value, str) and len(value) < 200
            if isinstance(value, (int, float, bool)) or short:
                item["input"] = value
            errors.append(item)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(QueueError)
    async def _refused(request: Request, exc: QueueError):
        status, headers = 422, None
        if isinstance(exc, errors.AdapterExists):
            status = 409
        elif isinstance(exc, errors.QuotaExceeded):
            status, headers = 429, {"Retry-After": "30"}
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    return app


def main_app() -> FastAPI:
    """Factory for ``uvicorn --factory api.app:main_app`` (what ``lorry api`` runs)."""
    return create_app()
