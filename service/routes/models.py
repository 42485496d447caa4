"""/v1/models: the model bundles the workers can run; for each tenant its registry (retrained versions, their lineage
and validation figures, which one is live), its retrainings (queued on ISL_TRAIN_QUEUE) and promotions; and the
agreement of the masks with the corrections radiologists sent back."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from jobstore.records import RetrainOptions
from service.actions import models as actions
from service.deps import Actor, QueueDep, SettingsDep, StoreDep, Tenant
from service.views import Problem

router = APIRouter()


@router.get("/v1/models", summary="Model bundles the workers can run")
def models(who: Tenant, settings: SettingsDep, store: StoreDep) -> dict:
    """Each bundle with its base version, labels and sequences (`channels`, in the order a job sends them), and
    `live`: the version your jobs run on (null while the
    database cannot be read)."""
    return actions.models(settings, store, who)


@router.get("/v1/models/{name}/agreement", responses={404: {"model": Problem}, 503: {"model": Problem},
                                                     200: {"content": {"application/json": {}, "image/png": {}}}},
            summary="Agreement of the model's masks with your radiologists' corrections, per model version: volumes "
                    "before and after (paired t-test, Wilcoxon), Spearman, Dice, and the verdict; ?format=png: the "
                    "Bland-Altman plot of the latest version's batch")
def model_agreement(name: str, who: Tenant, settings: SettingsDep, store: StoreDep,
                    format: Literal["json", "png"] = "json",
                    group_by: Annotated[str | None, Query(max_length=64, description="split each version's batch by "
                                                         "this key of the cases' metadata (e.g. age_band)")] = None):
    if format == "png":
        return Response(actions.bland_altman(settings, store, who, name), media_type="image/png")
    return actions.agreement(settings, store, who, name, group_by)


class RetrainAccepted(BaseModel):
    id: str = Field(description="the retraining's id (32 hex digits)")
    model: str
    state: str = Field(description="queued, running, succeeded or failed")


@router.post("/v1/models/{name}/retrain", status_code=202, response_model=RetrainAccepted,
             responses={404: {"model": Problem}, 409: {"model": Problem}, 503: {"model": Problem}},
             summary="Queue a retraining of the model on its base data plus every correction your radiologists sent "
                     "(queue ISL_TRAIN_QUEUE); the new version goes live when the promotion rule passes")
def retrain(name: str, who: Tenant, actor: Actor, settings: SettingsDep, store: StoreDep, queue: QueueDep,
            response: Response, options: RetrainOptions | None = None) -> RetrainAccepted:
    training_id = actions.retrain(settings, store, queue, who, actor, name, options or RetrainOptions())
    response.headers["Location"] = f"/v1/models/{name}/trainings/{training_id}"
    return RetrainAccepted(id=training_id, model=name, state="queued")


@router.get("/v1/models/{name}/trainings", responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="Your retrainings of the model, newest first: state, parent version, the version made, the "
                    "promotion rule's verdict")
def trainings(name: str, who: Tenant, settings: SettingsDep, store: StoreDep) -> dict:
    return actions.trainings(settings, store, who, name)


@router.get("/v1/models/{name}/trainings/{training_id}", responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="One retraining")
def training(name: str, training_id: str, who: Tenant, store: StoreDep) -> dict:
    return actions.training(store, who, name, training_id)


@router.get("/v1/models/{name}/versions", responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="The model's versions for your tenant: the base bundle and every retrained version, with lineage, "
                    "the data each saw, validation figures and which one is live")
def versions(name: str, who: Tenant, settings: SettingsDep, store: StoreDep) -> dict:
    return actions.versions(settings, store, who, name)


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(max_length=128, description="the version to make live: a retrained one, or the base "
                                                     "bundle's (back to it)")
    force: bool = Field(False, description="promote a version that the rule rejected or could not judge")
    reason: str = Field("", max_length=2000, description="why, for the audit trail (required with force)")


@router.post("/v1/models/{name}/promote", responses={404: {"model": Problem}, 409: {"model": Problem},
                                                     422: {"model": Problem}, 503: {"model": Problem}},
             summary="Make a version of the model live for your tenant (the workers pick it up at their next job). "
                     "A version the promotion rule rejected or did not judge needs force and a reason")
def promote(name: str, body: Promotion, who: Tenant, actor: Actor, settings: SettingsDep, store: StoreDep) -> dict:
    return actions.promote(settings, store, who, actor, name, body.version, body.force, body.reason)
