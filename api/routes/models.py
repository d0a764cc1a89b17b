"""OpenAI Models: the base model and every adapter the tenant may name in ``model``."""
from __future__ import annotations

import os

from fastapi import APIRouter, Depends

from lorry.api.batch_input import base_model_name, is_base
from lorry.api.convert import epoch
from lorry.api.deps import get_queue, get_settings, get_tenant
from lorry.api.errors import ApiError, responses
from lorry.api.schemas import ModelList, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


def _base(settings) -> ModelOut:
    try:
        created = int(os.stat(settings.model).st_mtime)
    except OSError:  # a Hub id: no local directory
        created = 0
    return ModelOut(id=base_model_name(settings), created=created, owned_by="lorry")


def _models(queue, tenant, settings) -> list[ModelOut]:
    """The base model, then the adapters by name (the tenant's own hides a shared one of
    the same name, as a job's ``adapter`` resolves)."""
    out, seen = [_base(settings)], {base_model_name(settings)}
    for a in queue.list_adapters(tenant.id):
        if a.status != "ready" or a.name in seen:
            continue
        seen.add(a.name)
        out.append(ModelOut(id=a.name, created=int(epoch(a.created_at) or 0),
                            owned_by="shared" if a.tenant_id is None else tenant.name))
    return out


@router.get("", response_model=ModelList,
            summary="The base model (owned_by 'lorry') and the adapters you may use")
def list_models(tenant=Depends(get_tenant), queue=Depends(get_queue),
                settings=Depends(get_settings)):
    return ModelList(data=_models(queue, tenant, settings))


@router.get("/{model_id}", response_model=ModelOut, responses=responses(404),
            summary="One model: the base model (by its name or as 'base') or an adapter "
                    "you may use")
def get_model(model_id: str, tenant=Depends(get_tenant), queue=Depends(get_queue),
              settings=Depends(get_settings)):
    if is_base(model_id, base_model_name(settings)):   # "base" names it on every route too
        return _base(settings).model_copy(update={"id": model_id})
    for model in _models(queue, tenant, settings):
        if model.id == model_id:
            return model
    raise ApiError(404, f"no model {model_id!r}: use the base model "
                        f"{base_model_name(settings)!r} or one of your adapters (GET /v1/models)",
                   code="model_not_found", param="model")
