"""/v1/jobs/{id}/correction(s): a radiologist's correction of a refined mask comes back (a NIfTI label map on the
job's grid, or a DICOM SEG that references the job's series), is checked, stored beside the job out of the
retention policy's reach, and recorded with who sent it and what it changed."""
from __future__ import annotations

import json
import shutil
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Response, UploadFile
from pydantic import BaseModel, Field

from service.deps import Actor, FinishedJob, OwnedJob, SettingsDep, StorageDep, StoreDep
from service.intake import model_sequences, staging
from service.records import now
from service.storage import Storage, TooLarge
from service.uploads import sniff
from service.views import Problem

router = APIRouter()
CORRECTION = ("the corrected label map: NIfTI on the job's grid (as its mask.nii.gz), with the model's label values, "
              "or a DICOM SEG that references the job's DICOM series, with the model's label names as segment labels")


class CorrectionView(BaseModel):
    id: str = Field(description="correction id (32 hex digits)")
    job_id: str
    model: str = Field(description="the model bundle whose result it corrects")
    model_version: str
    actor: str = Field(description="who sent it: key:<first 12 hex digits of the API key's sha256>")
    created: float = Field(description="when it was received (Unix seconds)")
    source: str = Field(description="nifti or dicom-seg")
    per_label: dict[str, dict[str, float]] = Field(
        description="per label: refined_ml and corrected_ml (volumes), dice_refined_vs_corrected, and where both "
                    "masks hold the label hausdorff_mm and average_hausdorff_mm")
    voxels_changed: int = Field(description="voxels whose label the correction changed")
    note: str = ""


class CorrectionList(BaseModel):
    corrections: list[CorrectionView] = Field(description="oldest first; the last one is the job's current truth")


def _view(row: dict[str, Any]) -> CorrectionView:
    return CorrectionView(**{k: row[k] for k in ("id", "job_id", "model", "model_version", "actor", "created",
                                                 "source", "note")},
                          per_label=row["summary"]["per_label"], voxels_changed=row["summary"]["voxels_changed"])


@router.post("/v1/jobs/{job_id}/correction", status_code=201, response_model=CorrectionView,
             responses={404: {"model": Problem}, 409: {"model": Problem}, 410: {"model": Problem},
                        413: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
             summary="Send a radiologist's correction of the job's mask")
def correct(job: FinishedJob, actor: Actor, response: Response, settings: SettingsDep, store: StoreDep,
            storage: StorageDep, file: Annotated[UploadFile, File(description=CORRECTION)],
            note: Annotated[str, Form(max_length=2000, description="free text kept with it")] = "") -> CorrectionView:
    from service.validate import Invalid, check_correction

    if store.records is None:
        raise HTTPException(503, "this service keeps no database; corrections cannot be recorded")
    out = storage.job_dir(job.id) / "output"
    try:
        report = json.loads((out / "report.json").read_text())
    except FileNotFoundError:  # the retention policy deleted it since the job was read
        raise HTTPException(410, f"the results of job {job.id} were deleted by the retention policy") from None
    labels = {int(v): name for v, name in report["labels"].items()}
    with staging(settings) as folder:
        head = file.file.read(512)
        file.file.seek(0)
        kind = sniff(head)
        if kind not in ("nifti-gz", "nifti", "dicom"):
            raise HTTPException(422, f"{file.filename!r}: not a NIfTI label map or a DICOM SEG (judged by its bytes)")
        path = folder / {"nifti-gz": "correction.nii.gz", "nifti": "correction.nii", "dicom": "correction.dcm"}[kind]
        try:
            Storage.write_stream(path, iter(lambda: file.file.read(1 << 20), b""), settings.max_upload_bytes)
        except TooLarge:
            raise HTTPException(413, f"upload exceeds the limit of {settings.max_upload_bytes} bytes") from None
        try:
            summary = check_correction(path, storage.input_paths(job.id), job.options.series_uid,
                                       out / "mask.nii.gz", labels, folder / "files", _sequences(settings, job),
                                       job.options.sequence_series)
        except Invalid as exc:
            raise HTTPException(422, f"{file.filename!r}: {exc}") from None
        correction_id = uuid.uuid4().hex
        target = storage.correction_dir(job.tenant, job.id, correction_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        (folder / "files").rename(target)
    row = {"id": correction_id, "job_id": job.id, "tenant": job.tenant, "model": job.options.model,
           "model_version": str(report.get("model_version") or ""), "actor": actor, "created": now(),
           "source": summary["source"], "folder": str(target.relative_to(storage.root)),
           "label_sha256": summary["label_sha256"],
           "summary": {"per_label": summary["per_label"], "voxels_changed": summary["voxels_changed"],
                       "metadata": job.options.metadata},
           "note": note}
    try:
        store.records.add_correction(row, {"tenant": job.tenant, "actor": actor, "action": "correct",
                                           "job_id": job.id, "detail": {"correction": correction_id,
                                                                        "source": summary["source"]}})
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise HTTPException(503, "the database could not record the correction; nothing was kept, send it "
                                 "again") from None
    response.headers["Location"] = f"/v1/jobs/{job.id}/corrections"
    return _view(row)


def _sequences(settings, job) -> list[str] | None:
    """The sequences the job's model takes (None when its bundle is gone: the job's input is then read as one scan)."""
    try:
        return model_sequences(settings, job.options.model)
    except (OSError, ValueError):
        return None


@router.get("/v1/jobs/{job_id}/corrections", response_model=CorrectionList,
            responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="The job's corrections, oldest first")
def corrections(job: OwnedJob, store: StoreDep) -> CorrectionList:
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; there are no corrections")
    return CorrectionList(corrections=[_view(r) for r in store.records.corrections(job.tenant, job_id=job.id)])
