"""Corrections: a radiologist's corrected mask of a finished job (a NIfTI label map on the job's grid, or a DICOM
SEG that references the job's series) is checked, stored beside the job out of the retention policy's reach, and
recorded with who sent it and what it changed."""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from fastapi import HTTPException, UploadFile

from jobstore.errors import STORE_AWAY
from jobstore.records import Job, now
from jobstore.rows import Correction
from jobstore.store import JobStore
from service.deps import succeeded
from service.intake import model_sequences, staging
from service.settings import Settings
from service.storage import Storage, TooLarge
from service.uploads import sniff

NAMES = {"nifti-gz": "correction.nii.gz", "nifti": "correction.nii", "dicom": "correction.dcm"}


def correct(settings: Settings, store: JobStore, storage: Storage, job: Job, actor: str, file: UploadFile,
            note: str = "") -> Correction:
    """The correction's record, once checked, stored and recorded (its audit event with it): 409/410 before the
    job succeeded or once it was purged, 413 over the upload limit, 422 for a file that is no label map of the job,
    503 without a database (or while it cannot record it: then nothing is kept)."""
    job = succeeded(job)
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; corrections cannot be recorded")
    report = _report(storage, job)
    with staging(settings) as folder:
        path = _received(file, folder, settings.max_upload_bytes)
        summary = _checked(settings, storage, job, report, file.filename, path, folder / "files")
        correction_id = uuid.uuid4().hex
        target = storage.correction_dir(job.tenant, job.id, correction_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        (folder / "files").rename(target)
    row = Correction(id=correction_id, job_id=job.id, tenant=job.tenant, model=job.options.model,
                     model_version=str(report.get("model_version") or ""), actor=actor, created=now(),
                     source=summary["source"], folder=str(target.relative_to(storage.root)),
                     label_sha256=summary["label_sha256"],
                     summary={"per_label": summary["per_label"], "voxels_changed": summary["voxels_changed"],
                              "metadata": job.options.metadata},
                     note=note)
    _record(store, row, target)
    return row


def _report(storage: Storage, job: Job) -> dict:
    """The job's report.json (its labels and model version); 410 once the retention policy deleted it."""
    try:
        return json.loads((storage.job_dir(job.id) / "output" / "report.json").read_text())
    except FileNotFoundError:  # the retention policy deleted it since the job was read
        raise HTTPException(410, f"the results of job {job.id} were deleted by the retention policy") from None


def _received(file: UploadFile, folder: Path, limit: int) -> Path:
    """The upload written into the staging folder under a name of its kind, judged by its bytes; 422 for what is
    neither NIfTI nor DICOM, 413 over `limit` bytes."""
    head = file.file.read(512)
    file.file.seek(0)
    kind = sniff(head)
    if kind not in NAMES:
        raise HTTPException(422, f"{file.filename!r}: not a NIfTI label map or a DICOM SEG (judged by its bytes)")
    path = folder / NAMES[kind]
    try:
        Storage.write_stream(path, iter(lambda: file.file.read(1 << 20), b""), limit)
    except TooLarge:
        raise HTTPException(413, f"upload exceeds the limit of {limit} bytes") from None
    return path


def _checked(settings: Settings, storage: Storage, job: Job, report: dict, filename: str | None, path: Path,
             files: Path) -> dict:
    """What the correction changed (service/validate.py writes its label map into `files`); 422 with the reason for
    a file that is not a label map of this job."""
    from service.validate import Invalid, check_correction

    labels = {int(v): name for v, name in report["labels"].items()}
    out = storage.job_dir(job.id) / "output"
    try:
        return check_correction(path, storage.input_paths(job.id), job.options.series_uid, out / "mask.nii.gz",
                                labels, files, _sequences(settings, job), job.options.sequence_series)
    except Invalid as exc:
        raise HTTPException(422, f"{filename!r}: {exc}") from None


def _sequences(settings: Settings, job: Job) -> list[str] | None:
    """The sequences the job's model takes (None when its bundle is gone: the job's input is then read as one scan)."""
    try:
        return model_sequences(settings, job.options.model)
    except (OSError, ValueError):
        return None


def _record(store: JobStore, row: Correction, folder: Path) -> None:
    """The correction and its audit event in the database; 503 while it is away. Whatever fails, a correction that
    is not recorded is not kept."""
    recorded = False
    try:
        store.records.add_correction(row, {"tenant": row.tenant, "actor": row.actor, "action": "correct",
                                           "job_id": row.job_id, "detail": {"correction": row.id,
                                                                            "source": row.source}})
        recorded = True
    except STORE_AWAY:
        raise HTTPException(503, "the database could not record the correction; nothing was kept, send it "
                                 "again") from None
    finally:
        if not recorded:
            shutil.rmtree(folder, ignore_errors=True)


def job_corrections(store: JobStore, job: Job) -> list[Correction]:
    """The job's corrections, oldest first (the last one is its current truth); 503 without a database."""
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; there are no corrections")
    return store.records.corrections(job.tenant, job_id=job.id)
