"""Adapters: register (local path under an allowed root, or a Hub repo id), list, delete."""
from __future__ import annotations

import os
import re

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from lorry.api.convert import adapter_out
from lorry.api.deps import get_queue, get_settings, get_tenant
from lorry.api.schemas import NAME_PATTERN, AdapterCreate, AdapterList, AdapterOut

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def resolve_local(source: str, roots: list[str]) -> str:
    """The real path of ``source`` (symlinks resolved) if it lies under an allowed root."""
    real = os.path.realpath(os.path.expanduser(source))
    for root in roots:
        root_real = os.path.realpath(os.path.expanduser(root))
        if os.path.commonpath([real, root_real]) == root_real:
            return real
    raise HTTPException(422, f"adapter path {source!r} (resolved to {real!r}) is outside the "
                             f"allowed adapter roots {roots}; copy it under one of them or ask "
                             "the operator to add a root (LORRY_ADAPTER_ROOTS)")


def base_config(request: Request) -> dict:
    """The base model's config.json, read once (adapters are checked against its shapes)."""
    cfg = getattr(request.app.state, "base_config", None)
    if cfg is None:
        from lorry.engine.lora.spec import read_base_config

        try:
            cfg = read_base_config(request.app.state.settings.model)
        except FileNotFoundError as e:
            raise HTTPException(503, f"cannot validate adapters: {e}; set LORRY_MODEL to the "
                                     "base model directory") from None
        request.app.state.base_config = cfg
    return cfg


def validate_local(path: str, request: Request, settings) -> int:
    """Check the PEFT directory with the engine's torch-free rules; return its rank."""
    from lorry.engine.lora.spec import parse_adapter  # torch-free; its refusals are ValueErrors

    try:
        spec = parse_adapter(path, base_config(request), max_lora_rank=settings.max_lora_rank,
                             base_model=settings.model)
    except ValueError as e:
        raise HTTPException(422, f"adapter refused: {e}") from None
    return spec.max_rank or spec.r


@router.post("", response_model=AdapterOut, status_code=201, summary="Register an adapter")
def add_adapter(body: AdapterCreate, request: Request, tenant=Depends(get_tenant),
                queue=Depends(get_queue), settings=Depends(get_settings)):
    existing = queue.get_adapter(body.name, tenant.id)
    if existing is not None and existing.tenant_id == tenant.id:
        raise HTTPException(409, f"adapter {body.name!r} is already registered; delete it first")
    source, revision, rank = body.source, body.revision, None
    if source.startswith(("/", "~", ".")) or "\\" in source or not HUB_ID.match(source):
        if not source.startswith(("/", "~")):
            raise HTTPException(422, f"adapter source {source!r} is neither an absolute local "
                                     "path nor a Hub repo id of the form 'owner/name'")
        if revision is not None:
            raise HTTPException(422, "revision applies to Hub repo ids, not to local paths")
        source = resolve_local(source, settings.adapter_roots)
        rank = validate_local(source, request, settings)
    elif not settings.allow_hub_adapters:
        raise HTTPException(422, f"Hub adapters are disabled on this server ({source!r}); "
                                 "register a local path under an allowed root")
    else:
        revision = revision or "main"
    info = queue.register_adapter(body.name, source, tenant_id=tenant.id, revision=revision,
                                  base_model=settings.model, rank=rank)
    return adapter_out(info)


@router.get("", response_model=AdapterList, summary="Adapters you can use (yours and shared)")
def list_adapters(tenant=Depends(get_tenant), queue=Depends(get_queue)):
    return AdapterList(data=[adapter_out(a) for a in queue.list_adapters(tenant.id)])


@router.delete("/{name}", status_code=204, summary="Delete one of your adapters")
def delete_adapter(name: str = Path(pattern=NAME_PATTERN), tenant=Depends(get_tenant),
                   queue=Depends(get_queue)):
    if not queue.delete_adapter(name, tenant.id):
        raise HTTPException(404, f"no adapter {name!r} of yours")
