"""Jobs: submit a scan, cancel a job, hand out its result and its report (each download an audit event)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, UploadFile

from jobstore.records import RESULT_FORMATS, Job, JobOptions, JobState, now
from jobstore.store import JobStore
from service.deps import succeeded
from service.intake import enqueue, model_sequences, staging
from service.queue import Queue
from service.settings import Settings
from service.storage import Storage
from service.uploads import receive


def submit(settings: Settings, store: JobStore, storage: Storage, queue: Queue, tenant: str, actor: str,
           files: list[UploadFile], options: JobOptions, idempotency_key: str | None = None) -> Job:
    """The uploaded scan received (checked, staged), recorded, moved into its job's folder and queued; a retried
    upload with the same idempotency key returns the first upload's job (its body is not read again)."""
    if idempotency_key and (job := store.by_idempotency_key(tenant, idempotency_key)):
        return job
    with staging(settings) as folder:
        inputs = receive(files, folder, settings.max_upload_bytes, options.series_uid,
                         model_sequences(settings, options.model), options.sequence_series)
        return enqueue(store, storage, queue, tenant, folder, inputs, options, idempotency_key, actor)


def cancel(store: JobStore, job: Job, actor: str) -> Job:
    """A queued job never runs; a running one stops at its next step; an ended one is left as it is. 409 for a job
    that only the database still knows and that has ended there."""
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        store.audit(job.tenant, actor, "cancel", job.id, {"state": str(job.state)})
    try:
        if job.state == JobState.QUEUED:
            job = store.update(job.id, state=JobState.CANCELLED, cancel_requested=True, finished=now())
        elif job.state == JobState.RUNNING:
            job = store.update(job.id, cancel_requested=True)
    except KeyError:  # only the database knows it (Redis lost it): cancelled there, so the sweep never sends it
        ended = store.records.end(job.id, str(JobState.CANCELLED), "", now()) if store.records is not None else None
        if ended is None:
            raise HTTPException(409, f"job {job.id} has ended or is known only from its history") from None
        job = ended
    return job


@dataclass(frozen=True)
class Download:
    """A result file to serve: its checksum verified, its download audited."""

    path: Path
    media_type: str
    filename: str
    sha256: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Digest": f"sha-256={self.sha256}"}


def result(store: JobStore, storage: Storage, job: Job, actor: str, format: str) -> Download:
    """The job's label map in `format` (nifti, dicom-seg or rtstruct): 409/410 before it succeeded or once it was
    purged, 404 without that format, 500 when the stored file fails its checksum (it is not served)."""
    job = succeeded(job)
    entry = job.result.files.get(RESULT_FORMATS[format])
    if entry is None:
        raise HTTPException(404, f"job {job.id} has no {format} result ({_why_no_export(storage, job.id)})")
    path = storage.job_dir(job.id) / "output" / entry.path
    if not storage.verify(path, entry.sha256):
        raise HTTPException(500, f"the stored result of job {job.id} fails its checksum; it is not served")
    store.audit(job.tenant, actor, "download", job.id, {"format": format, "sha256": entry.sha256})
    media = "application/gzip" if format == "nifti" else "application/dicom"
    return Download(path, media, entry.path, entry.sha256)


def _why_no_export(storage: Storage, job_id: str) -> str:
    """Why a DICOM export is missing, as the job's report says (a DICOM series whose headers lack what a SEG or an
    RTSTRUCT must reference), else because the input was not DICOM."""
    try:
        report = json.loads((storage.job_dir(job_id) / "output" / "report.json").read_text())
        reason = report.get("dicom_exports", {}).get("not_written_because")
    except (OSError, ValueError):
        reason = None
    return reason or "DICOM SEG and RTSTRUCT need a DICOM input"


def report(store: JobStore, storage: Storage, job: Job, actor: str) -> dict:
    """The job's report (volumes, QA, timings, model version, checksum); 409/410 as for its result."""
    job = succeeded(job)
    store.audit(job.tenant, actor, "download", job.id, {"format": "report"})
    return json.loads((storage.job_dir(job.id) / "output" / "report.json").read_text())
