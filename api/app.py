"""The FastAPI application: tenants' REST API over the job queue (never imports torch)."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lorry.api import errors
from lorry.api.body_guard import BodyGuard
from lorry.api.errors import responses
from lorry.api.metrics import make_registry
from lorry.api.request_id import RequestId
from lorry.api.routes import adapters, batches, completions, files, health, jobs, models

log = logging.getLogger(__name__)
DESCRIPTION = """Submit generation jobs for many LoRA adapters of one base model, as durable
asynchronous jobs. Authenticate with `Authorization: Bearer <tenant API key>`.

Every error answers `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape) with its
HTTP status; 429 and 503 carry `Retry-After` (seconds). Every answer carries `x-request-id`."""


def create_app(settings=None, queue=None, nudger="auto", redis_client="auto") -> FastAPI:
    """Build the app.

    Parameters
    ----------
    settings : lorry.settings.Settings, optional
        Defaults to the environment's settings.
    queue : scheduler.JobQueue, optional
        Defaults to a ``JobQueue`` on ``settings.database_url`` (with its statement
        timeout).
    nudger : callable or None or "auto"
        Called after submissions to wake workers; "auto" nudges Celery through Redis.
    redis_client : redis.Redis or None or "auto"
        Where workers publish their figures for ``/metrics``; the API processes also count
        tenants' open completions and ingests there (api.tenant_slots; "auto": through a
        client of its own that does not retry).
    """
    if settings is None:
        from lorry.settings import get_settings

        settings = get_settings()
    if queue is None:
        from lorry.scheduler import JobQueue

        queue = JobQueue.for_settings(settings)
    if nudger == "auto":
        from lorry.api.nudge import DrainNudger

        nudger = DrainNudger(settings.broker_url, settings.redis_prefix, settings.nudge_ttl_seconds)
    slot_redis = redis_client
    if redis_client == "auto":
        import redis

        from lorry.api.tenant_slots import slot_client

        redis_client = redis.Redis.from_url(settings.broker_url, socket_timeout=2,
                                            socket_connect_timeout=2)
        slot_redis = slot_client(settings.broker_url)
    app = FastAPI(title="Lorry", version="0.1.0", description=DESCRIPTION, lifespan=_lifespan)
    app.state.settings, app.state.queue, app.state.nudger = settings, queue, nudger
    app.state.migrated = False  # health.require_migrated
    app.state.slot_redis = slot_redis
    app.state.registry, app.state.submitted = make_registry(
        queue, redis_client, settings.redis_prefix, tenant_labels=settings.metrics_tenant_labels)
    # Every route may answer these; the routes list their own (404, 409, 413, 429) too. An
    # invalid request is 422 on Lorry's routes, 400 on OpenAI's (errors.status_for).
    for module in (jobs, adapters):
        app.include_router(module.router, responses=responses(401, 422, 503))
    for module in (batches, files, models, completions):
        app.include_router(module.router, responses=responses(400, 401, 503))
    app.include_router(health.router)
    errors.install(app)
    # Batch and file uploads are counted while streamed; other bodies are small JSON.
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes,
                       max_json_bytes=settings.max_line_bytes,
                       idle_seconds=settings.body_idle_seconds)
    app.add_middleware(RequestId)   # outside BodyGuard: its refusals carry the id too
    app.openapi = lambda: _openapi(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """At start: refuse a job database behind this version's migrations (its reads and writes
    would fail on the missing columns: 500s); one that cannot be reached is checked again by
    /readyz, which answers 503 until it is migrated."""
    from lorry.scheduler.errors import NotMigrated, Unavailable

    try:
        health.require_migrated(app)
    except Unavailable as e:
        log.warning("cannot check the job database's migration at start (%s): /readyz "
                    "answers 503 until it can", e)
    except NotMigrated as e:
        log.error("the API does not start: %s", e)
        raise
    yield


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document, without the 422 FastAPI adds to every route with parameters on
    OpenAI's routes, which answer an invalid request 400 (``errors.status_for``)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from lorry.api.errors import OPENAI_PATHS

        spec = get_openapi(title=app.title, version=app.version, description=app.description,
                           routes=app.routes)
        for path, ops in spec.get("paths", {}).items():
            if path.startswith(OPENAI_PATHS):
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
        app.openapi_schema = spec
    return app.openapi_schema


def main_app() -> FastAPI:
    """Factory for ``uvicorn --factory api.app:main_app`` (what ``lorry api`` runs)."""
    return create_app()
