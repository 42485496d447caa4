"""/v1/models: the model bundles the workers can run, and the agreement of each one's masks with the corrections
radiologists sent back."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from service.deps import SettingsDep, StoreDep, Tenant
from service.intake import available_models
from service.views import Problem

router = APIRouter()


@router.get("/v1/models", summary="Model bundles the workers can run")
def models(who: Tenant, settings: SettingsDep) -> dict:
    return {"default": settings.default_model, "models": available_models(settings)}


@router.get("/v1/models/{name}/agreement", responses={404: {"model": Problem}, 503: {"model": Problem},
                                                     200: {"content": {"application/json": {}, "image/png": {}}}},
            summary="Agreement of the model's masks with your radiologists' corrections, per model version: volumes "
                    "before and after (paired t-test, Wilcoxon), Spearman, Dice, and the verdict; ?format=png: the "
                    "Bland-Altman plot of the latest version's batch")
def model_agreement(name: str, who: Tenant, settings: SettingsDep, store: StoreDep,
                    format: Literal["json", "png"] = "json",
                    group_by: Annotated[str | None, Query(max_length=64, description="split each version's batch by "
                                                         "this key of the cases' metadata (e.g. age_band)")] = None):
    from service.agreement import agreement, bland_altman_png

    if name not in available_models(settings):
        raise HTTPException(404, f"no model {name!r}")
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; there are no corrections")
    rows = store.records.corrections(who, model=name)
    if format == "png":
        if not rows:
            raise HTTPException(404, f"model {name!r} has no corrections from your tenant yet")
        return Response(bland_altman_png(rows, name, settings.agreement_dice, settings.agreement_spearman),
                        media_type="image/png")
    return {"model": name, **agreement(rows, settings.agreement_dice, settings.agreement_spearman,
                                       group_by=group_by)}
