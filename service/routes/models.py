"""/v1/models: the model bundles the workers can run; for each tenant its registry (retrained versions, their lineage
and validation figures, which one is live), its retrainings (queued on ISL_TRAIN_QUEUE) and promotions; and the
agreement of the masks with the corrections radiologists sent back."""
from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.deps import Actor, QueueDep, SettingsDep, StoreDep, Tenant
from service.intake import available_models
from service.records import RetrainOptions, now
from service.storage import JOB_ID
from service.views import Problem

router = APIRouter()


@router.get("/v1/models", summary="Model bundles the workers can run")
def models(who: Tenant, settings: SettingsDep, store: StoreDep) -> dict:
    """Each bundle with its base version, labels and sequences (`channels`, in the order a job sends them), and
    `live`: the version your jobs run on (null while the
    database cannot be read)."""
    out = available_models(settings)
    for name, info in out.items():
        try:
            live = store.records.live_version(who, name) if store.records is not None else None
            info["live"] = live["version"] if live else info["version"]
        except Exception:  # noqa: BLE001 - the database away: the list still answers, without the registry
            info["live"] = None
    return {"default": settings.default_model, "models": out}


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


class RetrainAccepted(BaseModel):
    id: str = Field(description="the retraining's id (32 hex digits)")
    model: str
    state: str = Field(description="queued, running, succeeded or failed")


def _records(store):
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; the model registry lives there")
    return store.records


def _base_version(settings, name: str) -> str:
    models = available_models(settings)
    if name not in models:
        raise HTTPException(404, f"no model {name!r}")
    return str(models[name]["version"])


@router.post("/v1/models/{name}/retrain", status_code=202, response_model=RetrainAccepted,
             responses={404: {"model": Problem}, 409: {"model": Problem}, 503: {"model": Problem}},
             summary="Queue a retraining of the model on its base data plus every correction your radiologists sent "
                     "(queue ISL_TRAIN_QUEUE); the new version goes live when the promotion rule passes")
def retrain(name: str, who: Tenant, actor: Actor, settings: SettingsDep, store: StoreDep, queue: QueueDep,
            response: Response, options: RetrainOptions | None = None) -> RetrainAccepted:
    _base_version(settings, name)
    records = _records(store)
    options = options or RetrainOptions()
    if any(t["state"] in ("queued", "running") for t in records.trainings(who, name)):
        raise HTTPException(409, f"a retraining of {name!r} for your tenant is already queued or running; wait for "
                                 "it to end (GET /v1/models/{name}/trainings)")
    live = records.live_version(who, name)
    row = {"id": uuid.uuid4().hex, "tenant": who, "model": name, "actor": actor, "created": now(),
           "parent_version": live["version"] if live else _base_version(settings, name),
           "options": options.model_dump(mode="json", exclude_unset=True)}
    records.add_training(row, {"tenant": who, "actor": actor, "action": "retrain",
                               "detail": {"model": name, "training": row["id"], "options": row["options"],
                                          "corrections": len({c["job_id"] for c in records.corrections(who,
                                                                                                      model=name)})}})
    try:
        queue.send_training(row["id"])
    except Exception:  # noqa: BLE001 - the broker away: the record says so, nothing waits for ever
        records.fail_training(row["id"], now(), "could not be queued: the job queue was unreachable")
        raise HTTPException(503, "the job queue is unreachable; the retraining was not queued, ask again") from None
    response.headers["Location"] = f"/v1/models/{name}/trainings/{row['id']}"
    return RetrainAccepted(id=row["id"], model=name, state="queued")


@router.get("/v1/models/{name}/trainings", responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="Your retrainings of the model, newest first: state, parent version, the version made, the "
                    "promotion rule's verdict")
def trainings(name: str, who: Tenant, settings: SettingsDep, store: StoreDep) -> dict:
    _base_version(settings, name)
    return {"model": name, "trainings": [_training(t) for t in _records(store).trainings(who, name)]}


@router.get("/v1/models/{name}/trainings/{training_id}", responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="One retraining")
def training(name: str, training_id: str, who: Tenant, store: StoreDep) -> dict:
    row = _records(store).training(training_id, who) if JOB_ID.match(training_id) else None
    if row is None or row["model"] != name:
        raise HTTPException(404, f"no retraining {training_id} of model {name!r}")
    return _training(row)


def _training(row: dict) -> dict:
    return {k: row[k] for k in ("id", "model", "state", "created", "started", "finished", "parent_version", "version",
                                "options", "outcome", "error", "actor")}


@router.get("/v1/models/{name}/versions", responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="The model's versions for your tenant: the base bundle and every retrained version, with lineage, "
                    "the data each saw, validation figures and which one is live")
def versions(name: str, who: Tenant, settings: SettingsDep, store: StoreDep) -> dict:
    base = _base_version(settings, name)
    rows = _records(store).versions(who, name)
    live = next((r["version"] for r in rows if r["status"] == "live"), base)
    keys = ("version", "parent", "status", "created", "data", "figures", "promoted", "promoted_by")
    return {"model": name, "live": live, "base": {"version": base, "status": "live" if live == base else "base"},
            "versions": [{k: r[k] for k in keys} | {"training": r["id"]} for r in rows]}


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
    base = _base_version(settings, name)
    records = _records(store)
    rows = {r["version"]: r for r in records.versions(who, name)}
    if body.version != base and body.version not in rows:
        raise HTTPException(404, f"no version {body.version!r} of model {name!r} for your tenant "
                                 f"(GET /v1/models/{name}/versions)")
    row = rows.get(body.version)
    passed = row is None or row["status"] in ("live", "retired") or row["figures"].get("promoted")
    if not passed and not body.force:
        verdict = row["figures"].get("reason") or "not judged"
        raise HTTPException(409, f"version {body.version} did not pass the promotion rule ({verdict}); send force "
                                 "with a reason to promote it anyway")
    if body.force and not passed and not body.reason.strip():
        raise HTTPException(422, "a forced promotion needs a reason (kept in the audit trail)")
    records.promote(who, name, None if row is None else body.version, actor, now(),
                    {"model": name, "version": body.version, "forced": bool(body.force and not passed),
                     "reason": body.reason or (row["figures"].get("reason", "") if row else "back to the base "
                                                                                            "bundle")})
    return {"model": name, "live": body.version}
