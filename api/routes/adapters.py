"""Adapters: register (local path under an allowed root, or a Hub repo id), list, delete."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Request

from lorry.api.batch_input import names_the_base
from lorry.api.convert import adapter_out
from lorry.api.deps import get_queue, get_settings, get_tenant
from lorry.api.errors import NO_RETRY, ApiError
from lorry.api.schemas import NAME_PATTERN, AdapterCreate, AdapterList, AdapterOut
from lorry.engine.lora.sources import LOCAL, check_source, tenant_roots  # torch-free
from lorry.scheduler.leases import clip_error

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def allowed_roots(settings, tenant_id: str | None) -> list[str]:
    """The roots a registration may name: ``{root}/{tenant id}`` for a tenant when roots are
    per tenant (LORRY_ADAPTER_ROOTS_PER_TENANT), else the plain roots."""
    if tenant_id is not None and settings.adapter_roots_per_tenant:
        return tenant_roots(settings.adapter_roots, tenant_id)
    return list(settings.adapter_roots)


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
    except (ValueError, OSError) as e:  # OSError: e.g. a name too long for the filesystem
        raise HTTPException(422, clip_error(f"adapter refused: {e}")) from None
    return spec.max_rank or spec.r


@router.post("", response_model=AdapterOut, status_code=201, summary="Register an adapter")
def add_adapter(body: AdapterCreate, request: Request, tenant=Depends(get_tenant),
                queue=Depends(get_queue), settings=Depends(get_settings)):
    if names_the_base(body.name, settings):
        raise ApiError(422, f"{body.name!r} names the base model on the OpenAI routes and in "
                            "batch lines (model=...); choose another adapter name",
                       code="reserved_name", param="name")
    existing = queue.get_adapter(body.name, tenant.id)
    if existing is not None and existing.tenant_id == tenant.id:
        raise ApiError(409, f"adapter {body.name!r} is already registered; delete it first",
                       code="adapter_exists", param="name",
                       headers=dict(NO_RETRY))   # the SDKs retry 409s
    try:  # the engine's rules (AdapterSourceError is a ValueError)
        src = check_source(body.source, revision=body.revision,
                           roots=allowed_roots(settings, tenant.id),
                           allow_hub=settings.allow_hub_adapters, reveal=False)
    except ValueError as e:
        raise HTTPException(422, clip_error(str(e))) from None
    source, revision, rank = src.location, body.revision, None
    if src.kind == LOCAL:
        if revision is not None:
            raise HTTPException(422, "revision applies to Hub repo ids, not to local paths")
        rank = validate_local(source, request, settings)
    else:
        revision = revision or "main"
    info = queue.register_adapter(body.name, source, tenant_id=tenant.id, revision=revision,
                                  base_model=settings.model, rank=rank,
                                  max_tenant_adapters=settings.max_adapters_per_tenant)
    return adapter_out(info)


@router.get("", response_model=AdapterList, summary="Adapters you can use (yours and shared)")
def list_adapters(tenant=Depends(get_tenant), queue=Depends(get_queue)):
    return AdapterList(data=[adapter_out(a) for a in queue.list_adapters(tenant.id)])


@router.delete("/{name}", status_code=204, summary="Delete one of your adapters")
def delete_adapter(name: str = Path(pattern=NAME_PATTERN), tenant=Depends(get_tenant),
                   queue=Depends(get_queue)):
    if not queue.delete_adapter(name, tenant.id):
        raise ApiError(404, f"no adapter {name!r} of yours", code="adapter_not_found",
                       param="name")
