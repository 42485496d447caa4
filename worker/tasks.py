"""The Celery glue: a thin task that takes a job id, runs the engine on the stored input, reports stage and
progress, and stores the result. One worker process per GPU, one job at a time, the model loaded once per
worker process and kept."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from service.jobs import P, JobStore, now
from service.queue import TASK, celery_config
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)
settings = Settings()
app = Celery("isl-worker")
app.conf.update(celery_config(settings))
_refiners: dict = {}


class Cancelled(Exception):
    pass


def _heartbeat(store: JobStore, name: str) -> None:
    while True:
        try:
            store.r.set(f"{P}worker:{name}", time.time(), ex=60)
        except Exception:  # Redis away for a moment: the next beat retries
            log.warning("heartbeat to Redis failed", exc_info=True)
        time.sleep(10)


@worker_process_init.connect
def _start_heartbeat(**_):
    name = f"{socket.gethostname()}-{os.getpid()}"
    threading.Thread(target=_heartbeat, args=(JobStore(settings.redis_url), name), daemon=True).start()


def _refiner(model: str, atlases: int | None):
    key = (model, atlases)
    if key not in _refiners:
        from worker.config import ISLConfig
        from worker.pipeline import load_refiner

        cfg = ISLConfig(device=settings.device)
        if atlases:
            cfg.atlases = atlases
        _refiners.clear()  # one model in memory per worker
        _refiners[key] = load_refiner(settings.models_dir / model, settings.atlas_dir, cfg, settings.device)
    return _refiners[key]


def _input_path(job_dir) -> list:
    folder = job_dir / "input"
    for name in ("image.nii.gz", "image.nii", "series.zip"):
        if (folder / name).is_file():
            return [folder / name]
    return [folder / "dicom"]


@app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, bind=True)
def refine_job(self, job_id: str) -> None:
    store, storage = JobStore(settings.redis_url), Storage(settings.storage_root)
    job, action = store.deliver(job_id, settings.max_deliveries, worker=self.request.hostname or "")
    if action != "run":
        log.info("job %s: %s", job_id, action)
        return
    job_dir = storage.job_dir(job_id)
    out_tmp, out = job_dir / "output.part", job_dir / "output"
    shutil.rmtree(out_tmp, ignore_errors=True)
    last = {"t": 0.0, "stage": ""}

    def progress(stage: str, fraction: float) -> None:
        """Writes are throttled to two a second (except when the stage changes); a cancel is seen at once."""
        if stage == last["stage"] and time.monotonic() - last["t"] < 0.5:
            current = store.get(job_id) or {}
        else:
            last.update(t=time.monotonic(), stage=stage)
            current = store.update(job_id, stage=stage, progress=round(fraction, 3))
        if current.get("cancel_requested"):
            raise Cancelled()

    try:
        from segmentation.errors import ISLError
        from worker.pipeline import refine_file

        progress("loading model", 0.0)
        refiner = _refiner(job["options"]["model"], job["options"].get("atlases"))
        report = refine_file(_input_path(job_dir), None, out_tmp, refiner=refiner, progress=progress)
        store.update(job_id, stage="writing", progress=0.99)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out_tmp, out)
        pipe = store.r.pipeline()
        for stage, seconds in report["seconds"].items():
            pipe.hincrbyfloat(f"{P}stage_seconds", f"{stage}:sum", seconds)
            pipe.hincrby(f"{P}stage_seconds", f"{stage}:count", 1)
        pipe.execute()
        pushed = ""
        if job["options"].get("stow") and settings.stow_url and "dicom_seg" in report["files"]:
            from service.stow import push

            try:
                push(settings.stow_url, [out / report["files"]["dicom_seg"]["path"]], settings.stow_api_key)
                pushed = "ok"
            except Exception as exc:  # noqa: BLE001 - the result stays available over the API; the reason is kept
                log.warning("job %s: pushing the DICOM SEG failed: %s", job_id, exc)
                pushed = f"pushing the DICOM SEG to {settings.stow_url} failed: {exc}"
        store.update(job_id, state="succeeded", stage="done", progress=1.0, finished=now(), push=pushed,
                     result={"files": report["files"], "model_version": report["model_version"]})
    except Cancelled:
        store.update(job_id, state="cancelled", finished=now())
    except SoftTimeLimitExceeded:
        store.update(job_id, state="failed", finished=now(),
                     error=f"the job ran past its time limit of {settings.job_time_limit_s} s and was stopped")
    except ISLError as exc:
        store.update(job_id, state="failed", finished=now(), error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any other failure ends the job failed with its reason, never silently
        log.exception("job %s failed", job_id)
        store.update(job_id, state="failed", finished=now(), error=f"internal error in the worker: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out_tmp, ignore_errors=True)
