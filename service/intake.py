"""From a received upload to a queued job, shared by the routes that accept scans (jobs, batches, DICOMweb):
the staging folder, the free-space and model checks, and `enqueue` (record, input moved into the job's folder,
job id on the queue)."""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import HTTPException

from jobstore.errors import STORE_AWAY
from jobstore.records import InputFile, Job, JobOptions
from jobstore.store import JobStore
from service import metrics
from service.queue import BROKER_AWAY, Queue
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("isl.api")


def available_models(settings: Settings) -> dict[str, dict]:
    """Bundle name -> its version and labels, for every bundle under the models folder."""
    out = {}
    for meta in sorted(Path(settings.models_dir).glob("*/bundle.json")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        out[meta.parent.name] = {"version": info.get("version"), "labels": info.get("labels"),
                                 "channels": _sequences(info)}
    return out


def _sequences(info: dict) -> list[str]:
    return (info.get("dataset") or {}).get("channels") or ["image"]


def model_sequences(settings: Settings, model: str) -> list[str]:
    """The sequences (channels) the model takes, in order (its bundle.json only: `model` was checked)."""
    return _sequences(json.loads((Path(settings.models_dir) / model / "bundle.json").read_text()))


def chosen_model(settings: Settings, model: str | None) -> str:
    """The model a submission names (or the default); 422 when no such bundle exists."""
    model = model or settings.default_model
    models = available_models(settings)
    if model not in models:
        raise HTTPException(422, f"unknown model {model!r}; available: {sorted(models)}")
    return model


def room_for_upload(settings: Settings) -> None:
    """507 while the storage root has less free space than the configured headroom."""
    if shutil.disk_usage(settings.storage_root).free < settings.min_free_mb * (1 << 20):
        raise HTTPException(507, f"the service's storage has less than {settings.min_free_mb} MB free; "
                                 "uploads are refused until space is freed")


@contextmanager
def staging(settings: Settings) -> Iterator[Path]:
    """A fresh staging folder for one request, removed afterwards whatever happens (queued inputs have been
    moved out of it by then)."""
    root = settings.storage_root / "staging" / uuid.uuid4().hex
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def enqueue(store: JobStore, storage: Storage, queue: Queue, who: str, staged: Path, inputs: list[InputFile],
            options: JobOptions, idempotency_key: str | None = None, actor: str = "") -> Job:
    """Job record (and its audit event: `actor` submitted it), input moved into the job's folder, job id on the
    queue."""
    job, created = store.create(who, inputs, options, idempotency_key)
    if created:
        store.audit(who, actor, "submit", job.id, {"model": options.model, "files": len(inputs),
                                                     "bytes": sum(i.bytes for i in inputs)})
        target = storage.job_dir(job.id) / "input"
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(target)
        metrics.UPLOADED.inc(sum(i.bytes for i in inputs))
        try:
            queue.send(job.id, options.priority)
        except BROKER_AWAY as exc:  # the broker is unreachable: say so, keep no orphan queued job
            log.exception("queueing job %s failed", job.id)
            store.abandon(job.id, f"could not be queued: {exc}", idempotency_key)
            raise HTTPException(503, "the job queue is unreachable; the upload was not queued, submit again",
                                headers={"Retry-After": "5"}) from None
        try:
            store.mark_sent(job.id)
        except STORE_AWAY:  # Redis away: sent all the same; the sweep's second copy is refused by the lease
            log.warning("job %s: sent, but not marked so", job.id, exc_info=True)
    return job
