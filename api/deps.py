"""Shared request dependencies: the job queue, the settings and the caller's tenant (bearer key)."""
from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lorry.api.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="the tenant's API key")


def get_queue(request: Request):
    return request.app.state.queue


def get_settings(request: Request):
    return request.app.state.settings


def get_tenant(request: Request,
               creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
    """The tenant owning the bearer key; 401 when the key is missing or unknown."""
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise missing_key()
    tenant = request.app.state.queue.authenticate(creds.credentials)
    if tenant is None:
        raise ApiError(401, "invalid API key", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return tenant


def missing_key() -> ApiError:
    return ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                    code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})


def bears_a_key(authorization: str | None) -> bool:
    """Whether an Authorization header carries a bearer key at all (as HTTPBearer reads it)."""
    scheme, _, key = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and bool(key.strip())


def nudge(request: Request, submitted: int) -> None:
    """Count ``submitted`` jobs and wake a GPU worker (de-duplicated; beat covers a lost one)."""
    request.app.state.submitted.inc(submitted)
    nudger = request.app.state.nudger
    if nudger is not None:
        nudger()
