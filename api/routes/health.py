"""Liveness, readiness (the database answers, is migrated, and the lease reaper runs) and the
Prometheus scrape endpoint (behind the operator's metrics token)."""
from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lorry.api.errors import ApiError, responses
from lorry.scheduler.errors import NotMigrated

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
metrics_bearer = HTTPBearer(auto_error=False, scheme_name="MetricsToken",
                            description="the operator's LORRY_METRICS_TOKEN")


@router.get("/healthz", summary="The process is up")
def healthz():
    return {"status": "ok"}


# The lease reaper counts as stopped when its last pass is older than this many seconds or
# four maintain intervals, whichever is longer (claims reap every few seconds, beat every
# maintain interval).
REAPER_LATE_MIN_S = 60.0


@router.get("/readyz", summary="The database answers, is migrated, and the lease reaper runs")
def readyz(request: Request):
    queue = request.app.state.queue
    try:
        require_migrated(request.app)
        ping = getattr(queue, "ping", None)
        ping() if ping else queue.authenticate("lorry_readiness_probe")  # key-shaped: queries
        late = reaper_late(queue, request.app.state.settings)
    except NotMigrated as e:  # names migrations only, no host: shown
        return JSONResponse({"status": "unavailable", "database": str(e)}, status_code=503,
                            headers={"Retry-After": "5"})
    except Exception as e:  # any DB error means not ready; the cause is logged, not shown
        # (this route needs no key, and a driver's message names hosts, files and SQL)
        log.warning("readyz: the database does not answer: %s: %s", type(e).__name__,
                    (str(e).strip().splitlines() or [""])[0][:300])
        return JSONResponse({"status": "unavailable", "database": "not answering"},
                            status_code=503, headers={"Retry-After": "5"})
    if late:
        return JSONResponse({"status": "unavailable", "reaper": late}, status_code=503,
                            headers={"Retry-After": "5"})
    return {"status": "ok"}


def require_migrated(app) -> None:
    """Raise ``errors.NotMigrated`` while the app's job database is behind this version's
    migrations (``errors.Unavailable`` while it cannot be reached); once it passed, never
    again."""
    if app.state.migrated:
        return
    require = getattr(app.state.queue, "require_migrated", None)
    if require is not None:  # (a queue of the tests' own may not tell)
        require()
    app.state.migrated = True


def reaper_late(queue, settings) -> str | None:
    """Why the lease reaper counts as stopped (the jobs of a lost worker would stay running),
    or None while it runs."""
    last_reap_at = getattr(queue, "last_reap_at", None)
    if last_reap_at is None:  # a queue that keeps no record of it
        return None
    limit = max(REAPER_LATE_MIN_S, 4 * float(getattr(settings, "maintain_interval", 15.0)))
    fix = ("start a worker (`lorry worker`: its claims requeue expired leases, and it runs "
           "the maintain task that `lorry beat` schedules)")
    last = last_reap_at()
    if last is None:
        return f"no pass of the lease reaper is recorded: expired leases are not requeued; {fix}"
    age = (queue.now() - last).total_seconds()
    if age <= limit:
        return None
    return (f"the lease reaper last ran {age:.0f} s ago (at {last.isoformat()} UTC; allowed: "
            f"{limit:.0f} s): jobs of a lost worker stay running; {fix}")


def check_metrics_token(request: Request,
                        creds: HTTPAuthorizationCredentials | None = Depends(metrics_bearer)):
    """404 while no LORRY_METRICS_TOKEN is set (the endpoint is off); 401 without it."""
    token = request.app.state.settings.metrics_token
    if token is None or not token.get_secret_value():
        raise ApiError(404, "/metrics is off: the operator sets LORRY_METRICS_TOKEN to serve "
                            "it to a scraper holding that token", code="metrics_disabled")
    given = creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "missing or invalid metrics token: send 'Authorization: Bearer "
                            "<LORRY_METRICS_TOKEN>'", code="invalid_metrics_token",
                       headers={"WWW-Authenticate": "Bearer"})


@router.get("/metrics", summary="Prometheus metrics (Authorization: Bearer <metrics token>)",
            response_class=Response, dependencies=[Depends(check_metrics_token)],
            responses=responses(401, 404, 503))
def metrics(request: Request):
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
