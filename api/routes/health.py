"""Liveness, readiness (the database answers) and the Prometheus scrape endpoint."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers")
def readyz(request: Request):
    queue = request.app.state.queue
    try:
        ping = getattr(queue, "ping", None)
        ping() if ping else queue.authenticate("lorry_readiness_probe")  # key-shaped: queries
    except Exception as e:  # any DB error means not ready; say which
        return JSONResponse({"status": "unavailable", "database": str(e)[:300]}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request):
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
