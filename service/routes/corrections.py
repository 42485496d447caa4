"""/v1/jobs/{id}/correction(s): a radiologist's correction of a refined mask comes back (a NIfTI label map on the
job's grid, or a DICOM SEG that references the job's series), is checked, stored beside the job out of the
retention policy's reach, and recorded with who sent it and what it changed."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import BaseModel, Field

from jobstore.rows import Correction
from service.actions import corrections as actions
from service.deps import Actor, FinishedJob, OwnedJob, SettingsDep, StorageDep, StoreDep
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


def _view(row: Correction) -> CorrectionView:
    return CorrectionView(**{k: getattr(row, k) for k in ("id", "job_id", "model", "model_version", "actor",
                                                          "created", "source", "note")},
                          per_label=row.summary["per_label"], voxels_changed=row.summary["voxels_changed"])


@router.post("/v1/jobs/{job_id}/correction", status_code=201, response_model=CorrectionView,
             responses={404: {"model": Problem}, 409: {"model": Problem}, 410: {"model": Problem},
                        413: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
             summary="Send a radiologist's correction of the job's mask")
def correct(job: FinishedJob, actor: Actor, response: Response, settings: SettingsDep, store: StoreDep,
            storage: StorageDep, file: Annotated[UploadFile, File(description=CORRECTION)],
            note: Annotated[str, Form(max_length=2000, description="free text kept with it")] = "") -> CorrectionView:
    row = actions.correct(settings, store, storage, job, actor, file, note)
    response.headers["Location"] = f"/v1/jobs/{job.id}/corrections"
    return _view(row)


@router.get("/v1/jobs/{job_id}/corrections", response_model=CorrectionList,
            responses={404: {"model": Problem}, 503: {"model": Problem}},
            summary="The job's corrections, oldest first")
def corrections(job: OwnedJob, store: StoreDep) -> CorrectionList:
    return CorrectionList(corrections=[_view(r) for r in actions.job_corrections(store, job)])
