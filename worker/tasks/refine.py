"""The task `isl.refine`: it takes a job id, runs the engine on the stored input, reports stage and progress,
and stores the result. One worker process per GPU, one job at a time, the model loaded once per worker process
and kept. The method lives elsewhere (worker/pipeline.py); this records what happened.

A job runs only under its lease (worker/tasks/lease.py): a redelivered copy of a job that still runs is
acknowledged without running, and every worker's heartbeat thread also requeues jobs whose worker died."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from jobstore.errors import STORE_AWAY
from jobstore.records import Job, JobResult, JobState, now
from jobstore.store import JobStore
from service.queue import TASK
from service.storage import Storage
from worker.tasks.app import app, job_store, settings
from worker.tasks.lease import Lease, LeaseLost, holder, holder_alive

log = logging.getLogger(__name__)
_refiners: dict = {}
_correction_atlases: dict = {}  # (model version, correction id) -> that correction as an atlas, per worker process
_live: dict = {}  # (tenant, model) -> the bundle folder this process last ran for them


class Cancelled(Exception):
    pass


def _refiner(store: JobStore, job: Job):
    """The refiner of the model version this job's tenant runs (the live one in the registry, looked up for every
    job, so that a promotion reaches the workers without a restart; the base bundle when none is live). With the
    database away, the version this process last ran for the tenant, or the base bundle."""
    from worker.tasks.train import live_bundle

    key = (job.tenant, job.options.model)
    try:
        folder, _ = live_bundle(store.records, *key)
        _live[key] = folder
    except STORE_AWAY:  # the database away: the job still runs, on the version last known
        folder = _live.get(key, Path(settings.models_dir) / job.options.model)
        log.warning("job %s: live model version not read (database unreachable); running %s", job.id, folder,
                    exc_info=True)
    cached = (folder, job.options.atlases)
    if cached not in _refiners:
        from isl.config import ISLConfig
        from isl.refiner import load_refiner

        cfg = ISLConfig(device=settings.device, **({"atlases": job.options.atlases} if job.options.atlases else {})
                        ).model_dump(exclude_unset=True)  # overrides on the configuration the bundle carries
        _refiners.clear()  # one model in memory per worker
        _refiners[cached] = load_refiner(folder, settings.atlas_dir, cfg)
    return _refiners[cached]


class _Progress:
    """The engine's progress callback: writes are throttled to two a second (except when the stage changes); a
    cancel is seen at once. Redis being away for a moment does not stop the job; a lost lease does (another
    worker runs it)."""

    def __init__(self, store: JobStore, job_id: str, lease: Lease):
        self.store, self.job_id, self.lease = store, job_id, lease
        self.t, self.stage = 0.0, ""

    def __call__(self, stage: str, fraction: float) -> None:
        if self.lease.lost.is_set():
            raise LeaseLost()
        try:
            if stage == self.stage and time.monotonic() - self.t < 0.5:
                current = self.store.get(self.job_id)
            else:
                self.t, self.stage = time.monotonic(), stage
                current = self.store.update(self.job_id, stage=stage, progress=round(fraction, 3))
        except STORE_AWAY:  # Redis away after its retries: progress is not worth the job
            log.warning("job %s: progress update failed", self.job_id, exc_info=True)
            return
        if current is not None and current.cancel_requested:
            raise Cancelled()


def _push(job: Job, out: Path, report: dict) -> str:
    """Send a DICOM job's results where its route asks: its DICOM SEG by STOW-RS to ISL_STOW_URL (a DICOMweb
    job), its SEG and/or RTSTRUCT by C-STORE to its tenant's ISL_DIMSE_DESTINATIONS entry (a DIMSE job). 'ok',
    the reasons it failed after ISL_PUSH_ATTEMPTS tries, or '' when nothing was to be sent."""
    files = report["files"]
    outcomes = []
    if job.options.stow and settings.stow_url and "dicom_seg" in files:
        from worker.tasks.stow import push

        outcomes.append(_retried(f"pushing the DICOM SEG to {settings.stow_url}", job.id, lambda: push(
            settings.stow_url, [out / files["dicom_seg"]["path"]], settings.stow_api_key)))
    if job.options.dimse:
        from worker.tasks.dimse import destinations, send

        dest = destinations(settings.dimse_destinations).get(job.tenant)
        kinds = [k for k in settings.dimse_send.split(",") if k in files]
        if dest is None:
            outcomes.append(f"no DIMSE destination is configured for tenant {job.tenant!r} (ISL_DIMSE_DESTINATIONS); "
                            "the results are available over the API")
        elif not kinds:
            outcomes.append(f"no {' or '.join(settings.dimse_send.split(','))} was written for this series "
                            f"({report.get('dicom_exports', {}).get('not_written_because', 'see the report')}); "
                            "nothing was sent")
        else:
            aet, host, port = dest
            paths = [out / files[k]["path"] for k in kinds]
            outcomes.append(_retried(f"sending {', '.join(kinds)} by C-STORE to {aet}@{host}:{port}", job.id,
                                     lambda: send(paths, dest, settings.dimse_ae_title)))
    failed = [o for o in outcomes if o != "ok"]
    return "; ".join(failed) if failed else ("ok" if outcomes else "")


def _retried(what: str, job_id: str, attempt) -> str:
    """'ok' once `attempt()` returns, trying ISL_PUSH_ATTEMPTS times with a doubling wait; else why it failed."""
    wait = settings.push_retry_s
    for n in range(1, settings.push_attempts + 1):
        try:
            attempt()
            return "ok"
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:  # noqa: BLE001 - the result stays available over the API; the reason is kept
            log.warning("job %s: %s failed (try %d of %d): %s", job_id, what, n, settings.push_attempts, exc)
            if n == settings.push_attempts:
                return f"{what} failed after {n} tries: {exc}"
            time.sleep(wait)
            wait *= 2
    return ""


def _corrections(store: JobStore, job: Job, refiner):
    """The tenant's corrected cases of this job's model, as atlases that join the bundle's for this job (the last
    correction of each job is its truth); None when there are none or ISL_CORRECTIONS_AS_ATLASES is off."""
    from imaging.io import read_image
    from isl.refiner import CORRECTION_PREFIX
    from isl.training.retrain import Correction

    if not settings.corrections_as_atlases or store.records is None:
        return None
    try:
        rows = store.records.corrections(job.tenant, model=job.options.model)
    except STORE_AWAY:  # the database away: this job is refined with the bundle's atlases only
        log.warning("job %s: corrections not read (database unreachable); the bundle's atlases only", job.id,
                    exc_info=True)
        return None
    latest = {r.job_id: r for r in rows}
    bank = None
    for row in latest.values():
        key = (refiner.bundle.version, row.id)
        if key not in _correction_atlases:
            folder = Path(settings.storage_root) / row.folder
            try:
                stored = Correction.stored(row.id, folder)
                _correction_atlases[key] = refiner.bundle.case_atlas(
                    CORRECTION_PREFIX + row.id, [read_image(p) for p in stored.images], read_image(stored.label))
            # broad on purpose: a stored file of any defect (truncated, foreign, another grid) is untrusted input,
            # and one unreadable correction must not fail the job (said once)
            except Exception:  # noqa: BLE001
                log.warning("correction %s (job %s) cannot join the atlas bank", row.id, row.job_id,
                            exc_info=True)
                _correction_atlases[key] = None
        atlas = _correction_atlases[key]
        if atlas is not None:
            bank = atlas if bank is None else bank.plus(atlas)
    return bank


def _run(job: Job, store: JobStore, job_dir: Path, lease: Lease) -> dict:
    """Refine the job's input into job_dir/output (swapped in whole); the fields of its successful end."""
    from worker.pipeline import refine_file

    out_tmp, out = job_dir / f"output.part-{os.getpid()}", job_dir / "output"
    progress = _Progress(store, job.id, lease)
    try:
        progress("loading model", 0.0)
        refiner = _refiner(store, job)
        sources = Storage(settings.storage_root).input_paths(job.id)
        report = refine_file(sources, None, out_tmp, refiner=refiner, progress=progress,
                             series_uid=job.options.series_uid, extra_atlases=_corrections(store, job, refiner),
                             sequence_series=job.options.sequence_series or None)
        store.update(job.id, stage="writing", progress=0.99)
        lease.check()
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out_tmp, out)
    finally:
        shutil.rmtree(out_tmp, ignore_errors=True)
    store.record_stage_seconds(report["seconds"])
    result = JobResult(files=report["files"], model_version=report["model_version"])
    return dict(state=JobState.SUCCEEDED, stage="done", progress=1.0, push=_push(job, out, report), result=result)


def _failure(job_id: str, exc: Exception) -> dict:
    """The fields of a run's end by `exc`, with the reason in words a person can act on."""
    from imaging.errors import ISLError

    if isinstance(exc, Cancelled):
        return dict(state=JobState.CANCELLED)
    if isinstance(exc, SoftTimeLimitExceeded):
        reason = f"the job ran past its time limit of {settings.job_time_limit_s} s and was stopped"
    elif isinstance(exc, ISLError):
        reason = str(exc)
    elif isinstance(exc, OSError):
        log.exception("job %s failed", job_id)
        reason = (f"the storage is full ({exc.strerror}); the job wrote nothing: free space and submit it again"
                  if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"input/output error in the worker: {exc}")
    else:
        log.exception("job %s failed", job_id)
        reason = f"internal error in the worker: {type(exc).__name__}: {exc}"
    return dict(state=JobState.FAILED, error=reason)


@app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, bind=True)
def refine_job(self, job_id: str) -> None:
    store, storage, me = job_store(), Storage(settings.storage_root), holder()
    job, action = store.deliver(job_id, settings.max_deliveries, me, settings.lease_s, holder_alive,
                                worker=self.request.hostname or "")
    if action != "run":
        log.warning("job %s: delivery not run (%s)", job_id, action)
        return
    lease = Lease(store, job_id, me)
    lease.start()
    job_dir = storage.job_dir(job_id)
    for stale in job_dir.glob("output.part*"):  # left by a run whose worker died
        shutil.rmtree(stale, ignore_errors=True)
    try:
        try:
            fields = _run(job, store, job_dir, lease)
        except LeaseLost:
            log.warning("job %s: lease lost (another worker took the job over); stopped", job_id)
            return
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with its reason, never silently
            fields = _failure(job_id, exc)
        try:
            lease.check()
        except LeaseLost:
            log.warning("job %s: lease lost; this run's outcome (%s) is dropped", job_id, fields["state"])
            return
        store.finish(job_id, me, finished=now(), **fields)
    finally:
        lease.done.set()
