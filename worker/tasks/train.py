"""The task `isl.retrain`, on its own queue (ISL_TRAIN_QUEUE, `train`): a tenant's model retrained on its base data
plus every correction of that tenant so far, self-configured again, judged against its parent by the promotion rule
(isl/training/retrain.py), and recorded in the model registry; live at once when the rule passes. The refinement
workers look the live version up for every job, so they pick it up without a restart.

A retraining is claimed in the database (a redelivered copy of one that runs is not run twice) and beats there
while it runs; a delivery that finds its worker dead, or silent for three leases, takes it over."""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from jobstore.database import Records
from jobstore.errors import STORE_AWAY
from jobstore.records import now
from jobstore.rows import Training
from service.queue import TRAIN_TASK
from worker.tasks.app import app, job_store, settings
from worker.tasks.lease import holder, holder_alive

log = logging.getLogger(__name__)


def version_folder(tenant: str, model: str, training_id: str, attempt: str) -> str:
    """Where a retrained version's bundle lies, relative to the storage root: one folder per attempt, so that a run
    taken over from a worker that only seemed dead never writes into the files of the one that took it over."""
    return f"models/{tenant}/{model}/{training_id}/{attempt}"


def live_bundle(records: Records | None, tenant: str, model: str) -> tuple[Path, str | None]:
    """(the bundle folder of the version of `model` that this tenant's jobs run on, its registry version or None
    for the base bundle under ISL_MODELS_DIR)."""
    row = records.live_version(tenant, model) if records is not None else None
    if row is None:
        return Path(settings.models_dir) / model, None
    return Path(settings.storage_root) / row.folder, row.version


def corrected_cases(records: Records, tenant: str, model: str) -> list:
    """Every job's latest correction for this tenant and model, as retraining cases."""
    from isl.training.retrain import Correction

    latest = {r.job_id: r for r in records.corrections(tenant, model=model)}
    root = Path(settings.storage_root)
    return [Correction.stored(r.id, root / r.folder) for r in latest.values()]


class _Beat(threading.Thread):
    def __init__(self, records: Records, training_id: str, me: str):
        super().__init__(daemon=True)
        self.records, self.training_id, self.me = records, training_id, me
        self.done, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(max(1.0, settings.lease_s / 3)):
            try:
                if not self.records.beat_training(self.training_id, self.me, now()):
                    self.lost.set()
                    return
            except STORE_AWAY:  # the database away for a moment: the next beat retries
                log.warning("training %s: beat failed", self.training_id, exc_info=True)


def _claim(task, records: Records, training_id: str, me: str) -> Training | None:
    """The training as this worker claimed it (queued, or taken over from a dead or silent worker); None when there
    is nothing to run: it has ended, or it was started more than ISL_MAX_DELIVERIES times (it then ends failed)."""
    row = records.claim_training(training_id, me, now() - 3 * settings.lease_s, now())
    if row is None:
        current = records.training(training_id)
        if current is None or current.state != "running":
            log.warning("training %s: delivery not run (%s)", training_id, current and current.state)
            return None
        if holder_alive(current.worker):  # running elsewhere: look again later, taking it over if silent by then
            raise task.retry(countdown=3 * settings.lease_s, max_retries=None)
        row = records.claim_training(training_id, me, now() + 1, now())  # its worker died on this host: now
        if row is None:  # another delivery took it over first
            return None
    if row.attempts > settings.max_deliveries:  # it kills its worker, or its time limit does
        records.finish_training(training_id, me, state="failed", finished=now(),
                                error=f"started {row.attempts - 1} times without finishing: its worker died or it "
                                      f"ran past ISL_TRAIN_TIME_LIMIT_S ({settings.train_time_limit_s} s) each time")
        return None
    return row


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, bind=True,
          time_limit=settings.train_time_limit_s, soft_time_limit=max(1, settings.train_time_limit_s - 60))
def retrain_job(self, training_id: str) -> None:
    import torch

    from isl.refiner import pick_device
    from isl.training.retrain import RetrainConfig, retrain

    records, me = job_store().records, holder()
    if records is None:
        log.error("training %s: this worker keeps no database; retraining needs one", training_id)
        return
    row = _claim(self, records, training_id, me)
    if row is None:
        return
    beat = _Beat(records, training_id, me)
    beat.start()
    tenant, model = row.tenant, row.model
    folder = version_folder(tenant, model, training_id, uuid.uuid4().hex[:12])
    out = Path(settings.storage_root) / folder
    t0 = time.perf_counter()
    try:
        try:
            parent_dir, _ = live_bundle(records, tenant, model)
            if settings.atlas_dir is None:
                raise RuntimeError("ISL_ATLAS_DIR is not set: retraining needs the base dataset the model was "
                                   "trained on")
            cases = corrected_cases(records, tenant, model)
            result = retrain(parent_dir, settings.atlas_dir, cases, out, RetrainConfig(**row.options),
                             pick_device(settings.device), progress=lambda m: log.info("training %s: %s",
                                                                                      training_id, m),
                             command=f"POST /v1/models/{model}/retrain (training {training_id})")
        except Exception as exc:  # noqa: BLE001 - any failure ends the training with its reason, never silently
            log.exception("training %s failed", training_id)
            shutil.rmtree(out, ignore_errors=True)
            reason = (f"it ran past its time limit of {settings.train_time_limit_s} s (ISL_TRAIN_TIME_LIMIT_S) and was "
                      "stopped" if isinstance(exc, SoftTimeLimitExceeded) else f"{type(exc).__name__}: {exc}")
            if not records.finish_training(training_id, me, state="failed", finished=now(), error=reason):
                log.warning("training %s: taken over by another worker; this failure is dropped", training_id)
            return
        version = {"id": training_id, "tenant": tenant, "model": model, "version": result["version"],
                   "parent": result["parent"], "folder": folder, "created": now(), "data": result["data"],
                   "figures": result["figures"]}
        outcome = result["outcome"] | {"seconds": round(time.perf_counter() - t0, 1)}
        audit = {"tenant": tenant, "actor": "rule", "action": "promote",
                 "detail": {"model": model, "version": result["version"], "training": training_id,
                            "reason": outcome["reason"]}} if outcome["promoted"] else None
        if beat.lost.is_set() or not records.finish_training(training_id, me, state="succeeded", finished=now(),
                                                             version=version, outcome=outcome, audit=audit):
            log.warning("training %s: taken over by another worker; this run's version is dropped", training_id)
            shutil.rmtree(out, ignore_errors=True)
        else:
            for stale in out.parent.iterdir():  # attempts of workers that died
                if stale != out:
                    shutil.rmtree(stale, ignore_errors=True)
    finally:
        beat.done.set()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
