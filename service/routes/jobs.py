"""/v1/jobs: upload a scan, follow its job (state, server-sent events), cancel it, fetch its result and report."""
from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from jobstore.records import UID_PATTERN, JobOptions, is_uid
from service.actions import jobs as actions
from service.actions.events import job_events
from service.deps import Actor, FinishedJob, OwnedJob, QueueDep, SettingsDep, StorageDep, StoreDep, Tenant
from service.intake import chosen_model
from service.views import JobList, JobView, Problem, job_view

router = APIRouter()
UPLOAD = ("one NIfTI (.nii/.nii.gz), one .zip of a DICOM series, or the DICOM files of one series; for a model of "
          "several sequences (GET /v1/models: channels), one NIfTI or zip per sequence, in the model's order, or one "
          "zip of a DICOM study holding a series per sequence")
RETRY = "a retried upload with the same key returns the same job"
METADATA = ("case metadata as a JSON object of short strings, e.g. {\"age_band\": \"40-60\"}; the agreement "
            "report can be split by any key (GET /v1/models/{name}/agreement?group_by=age_band)")
SEQUENCE_SERIES = ("for a model of several sequences sent as one zip of a DICOM study: which series is which sequence, "
                   "as a JSON object, e.g. {\"FLAIR\": \"1.2.840.1\", \"T1c\": \"1.2.840.2\"}; without it, each "
                   "sequence takes the one series whose description names it")
SERIES = ("for DICOM uploads that hold several series: the Series Instance UID of the one to refine (without it "
          "such an upload is refused with the list of its series)")


@router.post("/v1/jobs", status_code=202, response_model=JobView,
             responses={401: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem}},
             summary="Upload a scan and queue its refinement")
def submit(who: Tenant, actor: Actor, response: Response, settings: SettingsDep, store: StoreDep, storage: StorageDep,
           queue: QueueDep,
           files: Annotated[list[UploadFile], File(description=UPLOAD)],
           model: Annotated[str | None, Form(description="model bundle name (GET /v1/models)")] = None,
           atlases: Annotated[int | None, Form(ge=1, le=64, description="K atlases per scan")] = None,
           priority: Annotated[int, Form(ge=0, le=9, description="0 (first) .. 9 (last)")] = 5,
           series_uid: Annotated[str | None, Form(max_length=64, pattern=UID_PATTERN,
                                                  description=SERIES)] = None,
           metadata: Annotated[str | None, Form(max_length=2000, description=METADATA)] = None,
           sequence_series: Annotated[str | None, Form(max_length=2000, description=SEQUENCE_SERIES)] = None,
           idempotency_key: Annotated[str | None, Header(max_length=200, description=RETRY)] = None) -> JobView:
    options = JobOptions(model=chosen_model(settings, model), atlases=atlases, priority=priority, series_uid=series_uid,
                         metadata=case_metadata(metadata), sequence_series=series_of_sequences(sequence_series))
    job = actions.submit(settings, store, storage, queue, who, actor, files, options, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job, store)


def series_of_sequences(text: str | None) -> dict[str, str]:
    """The `sequence_series` form field: a JSON object of sequence name -> Series Instance UID; 422 otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise HTTPException(422, "sequence_series: not JSON; give an object such as "
                                 "{\"FLAIR\": \"1.2.840.1\"}") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and is_uid(v) for k, v in value.items()):
        raise HTTPException(422, "sequence_series: give a JSON object of sequence name -> Series Instance UID (digits "
                                 "and dots, at most 64 characters)")
    return value


def case_metadata(text: str | None) -> dict[str, str]:
    """The `metadata` form field: a JSON object of at most 16 string keys and values (64 characters each); 422
    with the problem otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise HTTPException(422, "metadata: not JSON; give an object such as {\"age_band\": \"40-60\"}") from None
    if not isinstance(value, dict) or len(value) > 16:
        raise HTTPException(422, "metadata: give a JSON object of at most 16 keys")
    for k, v in value.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool) or not 0 < len(k) <= 64 or len(str(v)) > 64:
            raise HTTPException(422, f"metadata: {k!r} must name a string or number of at most 64 characters")
    return {k: str(v) for k, v in value.items()}


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"model": Problem}}, summary="A job's state")
def get_job(job: OwnedJob, store: StoreDep) -> JobView:
    return job_view(job, store)


@router.get("/v1/jobs", response_model=JobList, summary="Your jobs, newest first")
def list_jobs(who: Tenant, store: StoreDep, offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
              limit: Annotated[int, Query(ge=1, le=200)] = 50) -> JobList:
    jobs, total = store.list(who, offset, limit)
    return JobList(jobs=[job_view(j, store) for j in jobs], total=total, offset=offset, limit=limit)


@router.get("/v1/jobs/{job_id}/events",
            responses={404: {"model": Problem}, 200: {"content": {"text/event-stream": {}}}},
            summary="Progress as server-sent events: one `job` event (a JobView) per change, ending at a final state")
async def events(job: OwnedJob, store: StoreDep, request: Request) -> StreamingResponse:
    # until the job's final state, or until the key that opened the stream is revoked (an `end` event says so)
    digest = request.state.key_hash

    def revoked() -> dict | None:
        return {"detail": "the API key of this stream was revoked"} if store.revoked(digest) else None

    return StreamingResponse(job_events(store, [job.id], request, revoked), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.delete("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"model": Problem}},
               summary="Cancel a job: a queued job never runs; a running one stops at its next step")
def cancel(job: OwnedJob, store: StoreDep, actor: Actor) -> JobView:
    return job_view(actions.cancel(store, job, actor), store)


@router.get("/v1/jobs/{job_id}/result", response_class=FileResponse,
            responses={200: {"content": {"application/gzip": {}, "application/dicom": {}},
                             "description": "the label map: NIfTI (gzip), DICOM SEG or RTSTRUCT; header Digest: "
                                            "sha-256=<hex>"},
                       404: {"model": Problem}, 409: {"model": Problem}, 410: {"model": Problem},
                       500: {"model": Problem}},
            summary="The refined label map, as NIfTI or (for DICOM input) DICOM SEG or RTSTRUCT; its checksum is "
                    "verified first")
def result(job: OwnedJob, storage: StorageDep, store: StoreDep, actor: Actor,
           format: Literal["nifti", "dicom-seg", "rtstruct"] = "nifti") -> FileResponse:
    # the job's state is checked after `format` is validated: a bad format of one's own job is a 422, as it was
    file = actions.result(store, storage, job, actor, format)
    return FileResponse(file.path, media_type=file.media_type, filename=file.filename, headers=file.headers)


@router.get("/v1/jobs/{job_id}/report", responses={404: {"model": Problem}, 409: {"model": Problem},
                                                   410: {"model": Problem}},
            summary="Volumes per label (mL), QA, timings per stage, model version and the result's checksum")
def report(job: FinishedJob, storage: StorageDep, store: StoreDep, actor: Actor) -> dict:
    return actions.report(store, storage, job, actor)
