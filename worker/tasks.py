"""The Celery glue: a thin task that takes a job id, runs the engine on the stored input, reports stage and
progress, and stores the result. One worker process per GPU, one job at a time, the model loaded once per
worker process and kept.

A job runs only under its lease (service/jobs.py): a redelivered copy of a job that still runs is
acknowledged without running, and every worker's heartbeat thread also requeues jobs whose worker died."""
from __future__ import annotations

import errno
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
from service.queue import TASK, Queue, celery_config
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)
settings = Settings()
app = Celery("isl-worker")
app.conf.update(celery_config(settings))
_refiners: dict = {}


class Cancelled(Exception):
    pass


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_alive(holder: str) -> bool:
    """A lease holder on another host is taken to be alive (its lease expires if not); on this host, its
    process is checked: a worker process killed here is taken over at once instead of after the lease."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat(store: JobStore, name: str) -> None:
    """Every few seconds: this process is alive (metrics, wait estimates), and jobs of dead workers go back
    to the queue."""
    queue = Queue(settings)
    while True:
        try:
            store.r.set(f"{P}worker:{name}", time.time(), ex=max(30, 3 * settings.lease_s))
            for job_id in store.requeue_orphans(queue.send, unsent_after_s=max(10, 2 * settings.lease_s)):
                log.warning("job %s: requeued (its worker stopped, or it was never sent)", job_id)
        except Exception:  # Redis away for a moment: the next beat retries
            log.warning("heartbeat to Redis failed", exc_info=True)
        time.sleep(min(10, max(1, settings.lease_s / 3)))


@worker_process_init.connect
def _start_heartbeat(**_):
    name = f"{socket.gethostname()}-{os.getpid()}"
    threading.Thread(target=_heartbeat, args=(JobStore(settings.redis_url), name), daemon=True).start()


class _Lease(threading.Thread):
    """Renews this run's lease every third of its TTL; `lost` is set if another holder took it."""

    def __init__(self, store: JobStore, job_id: str, holder: str):
        super().__init__(daemon=True)
        self.store, self.job_id, self.holder = store, job_id, holder
        self.lost, self.done = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(settings.lease_s / 3):
            try:
                if not self.store.renew(self.job_id, self.holder, settings.lease_s):
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - Redis away: the lease may lapse; the next renewal tells
                log.warning("job %s: renewing the lease failed", self.job_id, exc_info=True)


class LeaseLost(Exception):
    pass


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
    store, storage, holder = JobStore(settings.redis_url), Storage(settings.storage_root), _holder()
    job, action = store.deliver(job_id, settings.max_deliveries, holder, settings.lease_s, _holder_alive,
                                worker=self.request.hostname or "")
    if action != "run":
        log.warning("job %s: delivery not run (%s)", job_id, action)
        return
    lease = _Lease(store, job_id, holder)
    lease.start()
    job_dir = storage.job_dir(job_id)
    out_tmp, out = job_dir / f"output.part-{os.getpid()}", job_dir / "output"
    for stale in job_dir.glob("output.part*"):  # left by a run whose worker died
        shutil.rmtree(stale, ignore_errors=True)
    last = {"t": 0.0, "stage": ""}

    def progress(stage: str, fraction: float) -> None:
        """Writes are throttled to two a second (except when the stage changes); a cancel is seen at once.
        Redis being away for a moment does not stop the job; a lost lease does (another worker runs it)."""
        if lease.lost.is_set():
            raise LeaseLost()
        try:
            if stage == last["stage"] and time.monotonic() - last["t"] < 0.5:
                current = store.get(job_id) or {}
            else:
                last.update(t=time.monotonic(), stage=stage)
                current = store.update(job_id, stage=stage, progress=round(fraction, 3))
        except Exception:  # noqa: BLE001 - redis errors after retries: progress is not worth the job
            log.warning("job %s: progress update failed", job_id, exc_info=True)
            return
        if current.get("cancel_requested"):
            raise Cancelled()

    def end(**fields) -> None:
        if lease.lost.is_set() or not store.holds(job_id, holder):
            log.warning("job %s: lease lost; this run's outcome (%s) is dropped", job_id, fields.get("state"))
            return
        store.finish(job_id, holder, **fields)

    try:
        from segmentation.errors import ISLError
        from worker.pipeline import refine_file

        progress("loading model", 0.0)
        refiner = _refiner(job["options"]["model"], job["options"].get("atlases"))
        report = refine_file(_input_path(job_dir), None, out_tmp, refiner=refiner, progress=progress)
        store.update(job_id, stage="writing", progress=0.99)
        if lease.lost.is_set() or not store.holds(job_id, holder):
            raise LeaseLost()
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
        end(state="succeeded", stage="done", progress=1.0, finished=now(), push=pushed,
            result={"files": report["files"], "model_version": report["model_version"]})
    except LeaseLost:
        log.warning("job %s: lease lost (another worker took the job over); stopped", job_id)
    except Cancelled:
        end(state="cancelled", finished=now())
    except SoftTimeLimitExceeded:
        end(state="failed", finished=now(),
            error=f"the job ran past its time limit of {settings.job_time_limit_s} s and was stopped")
    except ISLError as exc:
        end(state="failed", finished=now(), error=str(exc))
    except OSError as exc:
        log.exception("job %s failed", job_id)
        reason = (f"the storage is full ({exc.strerror}); the job wrote nothing: free space and submit it again"
                  if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"input/output error in the worker: {exc}")
        end(state="failed", finished=now(), error=reason)
    except Exception as exc:  # noqa: BLE001 - any other failure ends the job failed with its reason, never silently
        log.exception("job %s failed", job_id)
        end(state="failed", finished=now(), error=f"internal error in the worker: {type(exc).__name__}: {exc}")
    finally:
        lease.done.set()
        shutil.rmtree(out_tmp, ignore_errors=True)
