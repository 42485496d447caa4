"""/v1/batches: several cases uploaded at once, all queued or none; a batch's jobs and their states."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Response, UploadFile

from jobstore.records import JobOptions
from service.deps import Actor, OwnedBatch, QueueDep, SettingsDep, StorageDep, StoreDep, Tenant
from service.intake import chosen_model, enqueue, staging
from service.uploads import receive
from service.views import BatchView, Problem, batch_view

router = APIRouter()
MAX_CASES = 500


@router.post("/v1/batches", status_code=202, response_model=BatchView,
             responses={401: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem}},
             summary="Upload several cases at once (one NIfTI or one .zip DICOM series per file); all or none are "
                     "queued")
def submit_batch(who: Tenant, actor: Actor, response: Response, settings: SettingsDep, store: StoreDep,
                 storage: StorageDep, queue: QueueDep,
                 files: Annotated[list[UploadFile], File(description="one case per file: NIfTI or .zip of a DICOM "
                                                                     "series")],
                 model: Annotated[str | None, Form()] = None,
                 atlases: Annotated[int | None, Form(ge=1, le=64)] = None,
                 priority: Annotated[int, Form(ge=0, le=9)] = 5) -> BatchView:
    model = chosen_model(settings, model)
    if len(files) > MAX_CASES:
        raise HTTPException(422, f"a batch holds at most {MAX_CASES} cases, not {len(files)}")
    with staging(settings) as root:
        staged, total = [], 0
        for i, f in enumerate(files):  # every case is received and read before any is queued
            inputs = receive([f], root / str(i), settings.max_upload_bytes - total)
            total += inputs[0].bytes
            staged.append((root / str(i), inputs))
        options = JobOptions(model=model, atlases=atlases, priority=priority)
        jobs = [enqueue(store, storage, queue, who, folder, inputs, options, actor=actor)
                for folder, inputs in staged]
    batch = store.create_batch(who, [j.id for j in jobs])
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return batch_view(batch, store)


@router.get("/v1/batches/{batch_id}", response_model=BatchView, responses={404: {"model": Problem}},
            summary="A batch's jobs and how many are in each state")
def get_batch(batch: OwnedBatch, store: StoreDep) -> BatchView:
    return batch_view(batch, store)
