"""Models: the bundles the workers can run; for each tenant its registry (retrained versions, their lineage and
validation figures, which one is live), its retrainings (queued on ISL_TRAIN_QUEUE) and promotions; and the
agreement of the masks with the corrections radiologists sent back."""
from __future__ import annotations

import uuid

from fastapi import HTTPException

from jobstore.errors import STORE_AWAY
from jobstore.records import RetrainOptions, now
from jobstore.rows import Correction, Training
from jobstore.store import JobStore
from service.intake import available_models
from service.queue import BROKER_AWAY, Queue
from service.settings import Settings
from service.storage import JOB_ID


def models(settings: Settings, store: JobStore, tenant: str) -> dict:
    """Each bundle with its base version, labels and sequences (`channels`, in the order a job sends them), and
    `live`: the version the tenant's jobs run on (None while the database cannot be read)."""
    out = available_models(settings)
    for name, info in out.items():
        try:
            live = store.records.live_version(tenant, name) if store.records is not None else None
            info["live"] = live.version if live else info["version"]
        except STORE_AWAY:  # the database away: the list still answers, without the registry
            info["live"] = None
    return {"default": settings.default_model, "models": out}


def _records(store: JobStore):
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; the model registry lives there")
    return store.records


def _base_version(settings: Settings, name: str) -> str:
    """The version of the bundle `name` as shipped; 404 for no such bundle."""
    bundles = available_models(settings)
    if name not in bundles:
        raise HTTPException(404, f"no model {name!r}")
    return str(bundles[name]["version"])


def _corrections(settings: Settings, store: JobStore, tenant: str, name: str) -> list[Correction]:
    """The tenant's corrections of the model's masks; 404 for no such model, 503 without a database."""
    if name not in available_models(settings):
        raise HTTPException(404, f"no model {name!r}")
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; there are no corrections")
    return store.records.corrections(tenant, model=name)


def agreement(settings: Settings, store: JobStore, tenant: str, name: str, group_by: str | None = None) -> dict:
    """Per model version: volumes before and after (paired t-test, Wilcoxon), Spearman, Dice and the verdict;
    `group_by`: each version's batch split by that key of the cases' metadata."""
    from service.agreement import agreement as judged

    rows = _corrections(settings, store, tenant, name)
    return {"model": name, **judged(rows, settings.agreement_dice, settings.agreement_spearman, group_by=group_by)}


def bland_altman(settings: Settings, store: JobStore, tenant: str, name: str) -> bytes:
    """The Bland-Altman plot (PNG) of the latest version's batch; 404 before the tenant sent any correction."""
    from service.agreement import bland_altman_png

    rows = _corrections(settings, store, tenant, name)
    if not rows:
        raise HTTPException(404, f"model {name!r} has no corrections from your tenant yet")
    return bland_altman_png(rows, name, settings.agreement_dice, settings.agreement_spearman)


def retrain(settings: Settings, store: JobStore, queue: Queue, tenant: str, actor: str, name: str,
            options: RetrainOptions) -> str:
    """The id of a retraining of the model, recorded (with its audit event) and queued; 409 while one is queued or
    running, 503 when the queue is unreachable (the record then says it failed: nothing waits for ever)."""
    _base_version(settings, name)
    records = _records(store)
    if any(t.state in ("queued", "running") for t in records.trainings(tenant, name)):
        raise HTTPException(409, f"a retraining of {name!r} for your tenant is already queued or running; wait for "
                                 "it to end (GET /v1/models/{name}/trainings)")
    live = records.live_version(tenant, name)
    row = {"id": uuid.uuid4().hex, "tenant": tenant, "model": name, "actor": actor, "created": now(),
           "parent_version": live.version if live else _base_version(settings, name),
           "options": options.model_dump(mode="json", exclude_unset=True)}
    corrected = len({c.job_id for c in records.corrections(tenant, model=name)})
    records.add_training(row, {"tenant": tenant, "actor": actor, "action": "retrain",
                               "detail": {"model": name, "training": row["id"], "options": row["options"],
                                          "corrections": corrected}})
    try:
        queue.send_training(row["id"])
    except BROKER_AWAY:
        records.fail_training(row["id"], now(), "could not be queued: the job queue was unreachable")
        raise HTTPException(503, "the job queue is unreachable; the retraining was not queued, ask again") from None
    return row["id"]


def trainings(settings: Settings, store: JobStore, tenant: str, name: str) -> dict:
    """The tenant's retrainings of the model, newest first."""
    _base_version(settings, name)
    return {"model": name, "trainings": [_training(t) for t in _records(store).trainings(tenant, name)]}


def training(store: JobStore, tenant: str, name: str, training_id: str) -> dict:
    """One retraining of the model; 404 for none of the tenant's."""
    row = _records(store).training(training_id, tenant) if JOB_ID.match(training_id) else None
    if row is None or row.model != name:
        raise HTTPException(404, f"no retraining {training_id} of model {name!r}")
    return _training(row)


def _training(row: Training) -> dict:
    return {k: getattr(row, k) for k in ("id", "model", "state", "created", "started", "finished", "parent_version",
                                         "version", "options", "outcome", "error", "actor")}


def versions(settings: Settings, store: JobStore, tenant: str, name: str) -> dict:
    """The base bundle and every retrained version for the tenant, with lineage, data, figures and which is live."""
    base = _base_version(settings, name)
    rows = _records(store).versions(tenant, name)
    live = next((r.version for r in rows if r.status == "live"), base)
    keys = ("version", "parent", "status", "created", "data", "figures", "promoted", "promoted_by")
    return {"model": name, "live": live, "base": {"version": base, "status": "live" if live == base else "base"},
            "versions": [{k: getattr(r, k) for k in keys} | {"training": r.id} for r in rows]}


def promote(settings: Settings, store: JobStore, tenant: str, actor: str, name: str, version: str,
            force: bool = False, reason: str = "") -> dict:
    """Make `version` of the model live for the tenant (a retrained one, or the base bundle's); one the promotion
    rule rejected or did not judge needs `force` (409 without) and a reason (422 without)."""
    base = _base_version(settings, name)
    records = _records(store)
    rows = {r.version: r for r in records.versions(tenant, name)}
    if version != base and version not in rows:
        raise HTTPException(404, f"no version {version!r} of model {name!r} for your tenant "
                                 f"(GET /v1/models/{name}/versions)")
    row = rows.get(version)
    passed = row is None or row.status in ("live", "retired") or row.figures.get("promoted")
    if not passed and not force:
        verdict = row.figures.get("reason") or "not judged"
        raise HTTPException(409, f"version {version} did not pass the promotion rule ({verdict}); send force "
                                 "with a reason to promote it anyway")
    if force and not passed and not reason.strip():
        raise HTTPException(422, "a forced promotion needs a reason (kept in the audit trail)")
    why = reason or (row.figures.get("reason", "") if row else "back to the base bundle")
    records.promote(tenant, name, None if row is None else version, actor, now(),
                    {"model": name, "version": version, "forced": bool(force and not passed), "reason": why})
    return {"model": name, "live": version}
