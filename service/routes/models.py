"""/v1/models: the model bundles the workers can run."""
from __future__ import annotations

from fastapi import APIRouter

from service.deps import SettingsDep, Tenant
from service.intake import available_models

router = APIRouter()


@router.get("/v1/models", summary="Model bundles the workers can run")
def models(who: Tenant, settings: SettingsDep) -> dict:
    return {"default": settings.default_model, "models": available_models(settings)}
