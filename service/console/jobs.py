"""The console's job pages: the job list (with the upload form), a job's page (its report, previews, corrections
and the correction form), its downloads, and the event stream that keeps a page current. A tenant sees its own
jobs only, exactly as through the API: another tenant's job is a 404, as no job. Uploads, corrections and
downloads are the API's own actions (service/actions/)."""
from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from fastapi import File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from jobstore.errors import STORE_AWAY
from jobstore.records import JobOptions, JobState
from service.actions import jobs as actions
from service.actions.corrections import correct
from service.actions.events import job_events
from service.console.pages import PAGE, console_router, page, read_json
from service.console.session import Session, Signed, check_csrf, live_session
from service.deps import StoreDep
from service.intake import available_models, chosen_model
from service.storage import JOB_ID
from service.views import job_view

router = console_router()
STATES = [s.value for s in JobState]
PREVIEW_FILE = re.compile(r"(axial|coronal|sagittal)_\d{2}\.png")


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, session: Signed, store: StoreDep,
         state: Annotated[str, Query(max_length=20)] = "", page: Annotated[int, Query(ge=1, le=100000)] = 1):
    return _jobs_page(request, session, store, state, page)


def _with_state(store, tenant: str, state: str, offset: int) -> list:
    """This page of the tenant's jobs in `state`: the jobs read page by page until the page of matches is full."""
    rows, seen, start, chunk = [], 0, 0, 500
    while len(rows) < PAGE:
        batch, total_all = store.list(tenant, start, chunk)
        for job in batch:
            if job.state == state:
                if seen >= offset and len(rows) < PAGE:
                    rows.append(job)
                seen += 1
        start += chunk
        if start >= total_all:
            break
    return rows


def _jobs_page(request: Request, session: Session, store, state: str = "", page_no: int = 1, error: str = "",
               status: int = 200) -> HTMLResponse:
    """The job list; `error` (a refused upload's reason) shown above it, with the refusal's status."""
    if state and state not in STATES:
        raise HTTPException(422, f"state {state!r} is none of {', '.join(STATES)}")
    offset = (page_no - 1) * PAGE
    if state:
        rows, total = _with_state(store, session.tenant, state, offset), None
    else:
        rows, total = store.list(session.tenant, offset, PAGE)
    views = [job_view(j, store) for j in rows]
    settings = request.app.state.settings
    return page(request, "jobs.html", {
        "session": session, "jobs": views, "state": state, "states": STATES, "page": page_no, "total": total,
        "more": (total is None and len(views) == PAGE) or (total is not None and offset + PAGE < total),
        "models": sorted(available_models(settings)), "default_model": settings.default_model, "error": error},
        status)


@router.post("/jobs")
def upload(request: Request, session: Signed, store: StoreDep,
           files: Annotated[list[UploadFile], File()], csrf: Annotated[str, Form(max_length=100)] = "",
           model: Annotated[str, Form(max_length=200)] = ""):
    """A scan (or a DICOM series, or one file per sequence) uploaded from the browser, taken in exactly as by
    POST /v1/jobs; then its job page (a refusal: the job list with the reason)."""
    check_csrf(session, csrf)
    state = request.app.state
    try:
        options = JobOptions(model=chosen_model(state.settings, model or None))
        job = actions.submit(state.settings, store, state.storage, state.queue, session.tenant, session.actor, files,
                             options)
    except HTTPException as e:
        return _jobs_page(request, session, store, error=f"The upload was refused: {e.detail}", status=e.status_code)
    return RedirectResponse(f"/console/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/correction")
def correction(request: Request, job_id: str, session: Signed, store: StoreDep,
               file: Annotated[UploadFile, File()], csrf: Annotated[str, Form(max_length=100)] = "",
               note: Annotated[str, Form(max_length=2000)] = ""):
    """A radiologist's corrected mask of the caller's finished job, taken in exactly as by
    POST /v1/jobs/{id}/correction; then the job page, which lists it (or says why it was refused)."""
    check_csrf(session, csrf)
    record = _owned(store, job_id, session)
    state = request.app.state
    try:
        correct(state.settings, store, state.storage, record, session.actor, file, note)
    except HTTPException as e:
        return _job_page(request, job_id, session, store, error=f"The correction was refused: {e.detail}",
                         status=e.status_code)
    return RedirectResponse(f"/console/jobs/{job_id}?corrected=true", status_code=303)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: str, session: Signed, store: StoreDep,
        corrected: Annotated[bool, Query()] = False):
    return _job_page(request, job_id, session, store, corrected=corrected)


def _job_page(request: Request, job_id: str, session: Session, store, error: str = "", status: int = 200,
              corrected: bool = False) -> HTMLResponse:
    """A job's page; `error` (a refused correction's reason) shown at its top, with the refusal's status."""
    record = store.get_owned(job_id, session.tenant) if JOB_ID.match(job_id) else None
    if record is None or record.tenant != session.tenant:
        return page(request, "not_found.html", {"session": session, "what": f"job {job_id}"}, 404)
    done = record.state == JobState.SUCCEEDED and record.purged is None
    output = request.app.state.storage.job_dir(record.id) / "output"
    report = read_json(output / "report.json") if done else None
    preview = read_json(output / "preview" / "preview.json") if done else None
    corrections = _corrections(store, record) if done else []
    return page(request, "job.html", {"session": session, "job": job_view(record, store), "record": record,
                                      "report": report, "preview": preview, "corrections": corrections,
                                      "error": error, "corrected": corrected},
                status)


def _corrections(store, record) -> list[dict]:
    """The corrections of a job, oldest first ([] without a database, or while it is away: the page says none)."""
    if store.records is None:
        return []
    try:
        return store.records.corrections(record.tenant, job_id=record.id)
    except STORE_AWAY:  # the database away: the page still shows the job
        return []


def _owned(store, job_id: str, session: Session):
    record = store.get_owned(job_id, session.tenant) if JOB_ID.match(job_id) else None
    if record is None or record.tenant != session.tenant:
        raise HTTPException(404, f"no job {job_id}")
    return record


@router.get("/jobs/{job_id}/download/{kind}")
def download(request: Request, job_id: str, kind: Literal["nifti", "dicom-seg", "rtstruct", "report"],
             session: Signed, store: StoreDep):
    """A result of the caller's own job, as the API serves it (checksum verified, an audit event by the key that
    signed in), as a file to save."""
    record = _owned(store, job_id, session)
    storage = request.app.state.storage
    if kind != "report":
        file = actions.result(store, storage, record, session.actor, kind)
        return FileResponse(file.path, media_type=file.media_type, filename=file.filename, headers=file.headers)
    body = actions.report(store, storage, record, session.actor)
    return Response(json.dumps(body, indent=2), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="report-{record.id}.json"'})


@router.get("/events")
async def events(request: Request, session: Signed, store: StoreDep,
                 ids: Annotated[str, Query(max_length=PAGE * 33)] = ""):
    """Server-sent events for the pages: one `job` event (a JobView) per change of any of the caller's jobs `ids`
    (comma-separated), until all are final, the browser leaves or the session ends (signed out, its key revoked);
    then an `end` event. One connection for a whole page: browsers allow few per host."""
    wanted = [i for i in ids.split(",") if JOB_ID.match(i)][:PAGE]
    owned = [i for i in wanted if (j := store.get_owned(i, session.tenant)) is not None and j.tenant == session.tenant]

    def ended() -> dict | None:
        return {} if live_session(request.app, store, session.id) is None else None

    return StreamingResponse(job_events(store, owned, request, ended, end={}), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/preview/{name}")
def preview_image(request: Request, job_id: str, name: str, session: Signed, store: StoreDep) -> FileResponse:
    """One preview slice of the caller's own finished job (404 for another tenant's, as for no job)."""
    _owned(store, job_id, session)
    path = request.app.state.storage.job_dir(job_id) / "output" / "preview" / name
    if not PREVIEW_FILE.fullmatch(name) or not path.is_file():
        raise HTTPException(404, f"no preview image {name} of job {job_id}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})  # a patient's image
