"""The FastAPI application: upload a scan, follow its job, fetch the refined mask and its report.

It validates, stores and queues; the GPU workers (`isl worker`) do the work. Never imports torch."""

import asyncio
import errno
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from service.jobs import FINAL, JobStore, now
from service.queue import Queue
from service.settings import Settings, hash_key
from service.storage import JOB_ID, Storage, TooLarge

GZIP, ZIP, DICM = b"\x1f\x8b", b"PK\x03\x04", b"DICM"
PROBES = ("/healthz", "/readyz")  # the only routes without credentials
log = logging.getLogger("isl.api")


class JobView(BaseModel):
    """What a client sees of a job."""

    id: str = Field(description="job id (32 hex digits)")
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(description="where the job is")
    queue_position: int | None = Field(None, description="0-based place in the queue while queued")
    estimated_wait_s: float | None = Field(None, description="while queued: seconds until a worker should take it, from the live "
                                                             "workers, the running jobs and the mean of recent job durations")
    stage: str = Field("", description="engine stage while running: baseline, registration, finetune, fusion, final, writing")
    progress: float = Field(0.0, description="0..1 while running; 1 when succeeded")
    error: str = Field("", description="why it failed, in words a person can act on")
    model: str = Field(description="model bundle that refines it")
    worker: str = Field("", description="the worker node that ran (or runs) it")
    push: str = Field("", description="for DICOMweb jobs with ISL_STOW_URL set: 'ok', or why pushing the DICOM SEG failed")
    created: float = Field(description="when it was accepted (Unix seconds)")
    started: float | None = Field(None, description="when a worker took it (Unix seconds)")
    finished: float | None = Field(None, description="when it ended (Unix seconds)")
    links: dict[str, str] = Field(default_factory=dict, description="related URLs: self, events, result, report")


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="this page, newest first")
    total: int = Field(description="all of the caller's jobs")
    offset: int = Field(description="index of the first job of this page")
    limit: int = Field(description="page size")


class BatchView(BaseModel):
    id: str = Field(description="batch id")
    created: float = Field(description="when it was accepted (Unix seconds)")
    counts: dict[str, int] = Field(description="jobs per state")
    done: bool = Field(description="every job has ended (succeeded, failed or cancelled)")
    jobs: list[JobView] = Field(description="its jobs, in upload order")


class Problem(BaseModel):
    detail: str = Field(description="what is wrong, in words a person can act on")


def _sniff(head: bytes) -> str | None:
    if head.startswith(ZIP):
        return "zip"
    if head.startswith(GZIP):
        return "nifti-gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"n+2\x00"):
        return "nifti"
    if len(head) >= 132 and head[128:132] == DICM:
        return "dicom"
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keys = settings.tenants_by_key_hash()  # refuses to start without keys unless in development mode
    store, storage, queue = JobStore(settings.redis_url), Storage(settings.storage_root), Queue(settings)
    from service import metrics

    app = FastAPI(title="ISL refinement service", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Upload a 3D scan; a GPU worker refines its segmentation by inference-specific "
                              "learning; fetch the mask (NIfTI or DICOM SEG) and a report with volumes per label.")
    header = APIKeyHeader(name="X-API-Key", auto_error=False,
                          description="your tenant's API key (or `Authorization: Bearer <key>`)")

    def tenant(request: Request, key: Annotated[str | None, Depends(header)]) -> str:
        if key is None:
            auth = request.headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else None
        digest = hash_key(key) if key else ""
        name = keys.get(digest)
        if name is None or store.revoked(digest):
            raise HTTPException(401, "a valid API key is required (X-API-Key header or Authorization: Bearer)",
                                headers={"WWW-Authenticate": 'Bearer realm="isl"'})
        return name

    Tenant = Annotated[str, Depends(tenant)]

    def own_job(job_id: str, who: str) -> dict:
        job = store.get(job_id) if JOB_ID.match(job_id) else None
        if job is None or job["tenant"] != who:  # another tenant's job is indistinguishable from none
            raise HTTPException(404, f"no job {job_id}")
        return job

    def view(job: dict) -> JobView:
        base = f"/v1/jobs/{job['id']}"
        links = {"self": base, "events": f"{base}/events"}
        if job["state"] == "succeeded":
            links.update(result=f"{base}/result", report=f"{base}/report")
        return JobView(id=job["id"], state=job["state"], stage=job["stage"], progress=job["progress"],
                       error=job["error"], model=job["options"]["model"], worker=job.get("worker", ""), push=job.get("push", ""), created=job["created"],
                       started=job["started"], finished=job["finished"],
                       queue_position=store.position(job["id"]) if job["state"] == "queued" else None,
                       estimated_wait_s=store.estimate_wait(job["id"]) if job["state"] == "queued" else None, links=links)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > settings.max_upload_bytes + (1 << 20):
            return JSONResponse({"detail": f"upload of {length} bytes exceeds the limit of {settings.max_upload_bytes}"}, 413)
        return await call_next(request)

    @app.exception_handler(OSError)
    async def storage_error(request: Request, exc: OSError) -> JSONResponse:
        """A full disk is the client's 507 (try later), nothing half-written stays (staging is removed)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("storage full: %s", exc)
            return JSONResponse({"detail": "the service's storage is full; nothing was kept, submit again later"}, 507)
        log.exception("storage error")
        return JSONResponse({"detail": "internal storage error; nothing was kept"}, 500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one readable sentence, as every other error (the Problem schema), not FastAPI's list."""
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Allow: every method of every route on this path, not just the first route's
            from starlette.routing import Match

            allowed = set()
            for route in app.routes:
                match, _ = route.matches({"type": "http", "path": request.url.path, "method": "GET"})
                if match != Match.NONE:
                    allowed |= set(getattr(route, "methods", None) or ())
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)

    def room_for_upload() -> None:
        if shutil.disk_usage(settings.storage_root).free < settings.min_free_mb * (1 << 20):
            raise HTTPException(507, f"the service's storage has less than {settings.min_free_mb} MB free; "
                                     "uploads are refused until space is freed")

    @app.post("/v1/jobs", status_code=202, response_model=JobView,
              responses={401: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem}},
              summary="Upload a scan and queue its refinement")
    def submit(who: Tenant, response: Response,
               files: Annotated[list[UploadFile], File(description="one NIfTI (.nii/.nii.gz), one .zip of a DICOM series, or the DICOM files of one series")],
               model: Annotated[str | None, Form(description="model bundle name (GET /v1/models)")] = None,
               atlases: Annotated[int | None, Form(ge=1, le=64, description="K atlases per scan")] = None,
               priority: Annotated[int, Form(ge=0, le=9, description="0 (first) .. 9 (last)")] = 5,
               idempotency_key: Annotated[str | None, Header(max_length=200, description="a retried upload with the same key returns the same job")] = None) -> JobView:
        model = model or settings.default_model
        if model not in _models(settings):
            raise HTTPException(422, f"unknown model {model!r}; available: {sorted(_models(settings))}")
        if idempotency_key and (job := store.by_idempotency_key(who, idempotency_key)):
            response.headers["Location"] = f"/v1/jobs/{job['id']}"
            return view(job)  # a retried upload: the body is not read again
        room_for_upload()
        staging = settings.storage_root / "staging" / uuid.uuid4().hex
        try:
            inputs = _receive(files, staging, storage, settings.max_upload_bytes)
            job = enqueue(who, staging, inputs, {"model": model, "atlases": atlases, "priority": priority}, idempotency_key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        response.headers["Location"] = f"/v1/jobs/{job['id']}"
        return view(job)

    def enqueue(who: str, staged: Path, inputs: list[dict], options: dict, idempotency_key: str | None = None) -> dict:
        """Job record, input moved into the job's folder, job id on the queue."""
        job, created = store.create(who, inputs, options, idempotency_key)
        if created:
            target = storage.job_dir(job["id"]) / "input"
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(target)
            metrics.UPLOADED.inc(sum(i["bytes"] for i in inputs))
            try:
                queue.send(job["id"], options["priority"])
                store.mark_sent(job["id"])
            except Exception as exc:  # noqa: BLE001 - the broker is unreachable: say so, keep no orphan queued job
                log.exception("queueing job %s failed", job["id"])
                store.update(job["id"], state="failed", finished=now(), error=f"could not be queued: {exc}")
                raise HTTPException(503, "the job queue is unreachable; the upload was not queued, submit again") from None
        return job

    @app.post("/v1/batches", status_code=202, response_model=BatchView,
              responses={401: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem}},
              summary="Upload several cases at once (one NIfTI or one .zip DICOM series per file); all or none are queued")
    def submit_batch(who: Tenant, response: Response,
                     files: Annotated[list[UploadFile], File(description="one case per file: NIfTI or .zip of a DICOM series")],
                     model: Annotated[str | None, Form()] = None,
                     atlases: Annotated[int | None, Form(ge=1, le=64)] = None,
                     priority: Annotated[int, Form(ge=0, le=9)] = 5) -> BatchView:
        model = model or settings.default_model
        if model not in _models(settings):
            raise HTTPException(422, f"unknown model {model!r}; available: {sorted(_models(settings))}")
        if len(files) > 500:
            raise HTTPException(422, f"a batch holds at most 500 cases, not {len(files)}")
        room_for_upload()
        root = settings.storage_root / "staging" / uuid.uuid4().hex
        try:
            staged, total = [], 0
            for i, f in enumerate(files):
                inputs = _receive([f], root / str(i), storage, settings.max_upload_bytes - total)
                total += inputs[0]["bytes"]
                staged.append((root / str(i), inputs))
            options = {"model": model, "atlases": atlases, "priority": priority}
            jobs = [enqueue(who, folder, inputs, options) for folder, inputs in staged]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        batch = store.create_batch(who, [j["id"] for j in jobs])
        response.headers["Location"] = f"/v1/batches/{batch['id']}"
        return batch_view(batch)

    def batch_view(batch: dict) -> BatchView:
        jobs = [view(j) for j in (store.get(i) for i in batch["jobs"]) if j]
        counts = {}
        for j in jobs:
            counts[j.state] = counts.get(j.state, 0) + 1
        return BatchView(id=batch["id"], created=batch["created"], counts=counts, done=all(j.state in FINAL for j in jobs),
                         jobs=jobs)

    @app.get("/v1/batches/{batch_id}", response_model=BatchView, responses={404: {"model": Problem}},
             summary="A batch's jobs and how many are in each state")
    def get_batch(batch_id: str, who: Tenant) -> BatchView:
        batch = store.get_batch(batch_id) if JOB_ID.match(batch_id) else None
        if batch is None or batch["tenant"] != who:
            raise HTTPException(404, f"no batch {batch_id}")
        return batch_view(batch)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"model": Problem}}, summary="A job's state")
    def get_job(job_id: str, who: Tenant) -> JobView:
        return view(own_job(job_id, who))

    @app.get("/v1/jobs", response_model=JobList, summary="Your jobs, newest first")
    def list_jobs(who: Tenant, offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> JobList:
        jobs, total = store.list(who, offset, limit)
        return JobList(jobs=[view(j) for j in jobs], total=total, offset=offset, limit=limit)

    @app.get("/v1/jobs/{job_id}/events", responses={404: {"model": Problem}, 200: {"content": {"text/event-stream": {}}}},
             summary="Progress as server-sent events: one `job` event (a JobView) per change, ending at a final state")
    async def events(job_id: str, who: Tenant, request: Request) -> StreamingResponse:
        own_job(job_id, who)

        async def stream():
            last, idle = None, 0.0
            while not await request.is_disconnected():
                current = await asyncio.to_thread(store.get, job_id)
                payload = view(current).model_dump_json()
                if payload != last:
                    last, idle = payload, 0.0
                    yield f"event: job\ndata: {payload}\n\n"
                    if current["state"] in FINAL:
                        return
                elif idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.5)
                idle += 0.5

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"model": Problem}},
                summary="Cancel a job: a queued job never runs; a running one stops at its next step")
    def cancel(job_id: str, who: Tenant) -> JobView:
        job = own_job(job_id, who)
        if job["state"] == "queued":
            job = store.update(job_id, state="cancelled", cancel_requested=True, finished=now())
        elif job["state"] == "running":
            job = store.update(job_id, cancel_requested=True)
        return view(job)

    def finished_job(job_id: str, who: str) -> dict:
        job = own_job(job_id, who)
        if job["state"] != "succeeded":
            raise HTTPException(409, f"job {job_id} is {job['state']}; results exist once it has succeeded")
        return job

    @app.get("/v1/jobs/{job_id}/result", response_class=FileResponse,
             responses={200: {"content": {"application/gzip": {}, "application/dicom": {}},
                              "description": "the label map: NIfTI (gzip) or DICOM SEG; header Digest: sha-256=<hex>"},
                        404: {"model": Problem}, 409: {"model": Problem}, 500: {"model": Problem}},
             summary="The refined label map, as NIfTI or (for DICOM input) DICOM SEG; its checksum is verified first")
    def result(job_id: str, who: Tenant, format: Literal["nifti", "dicom-seg"] = "nifti") -> FileResponse:
        job = finished_job(job_id, who)
        key = "mask" if format == "nifti" else "dicom_seg"
        entry = job["result"]["files"].get(key)
        if entry is None:
            raise HTTPException(404, f"job {job_id} has no {format} result (DICOM SEG needs a DICOM input)")
        path = storage.job_dir(job_id) / "output" / entry["path"]
        if not storage.verify(path, entry["sha256"]):
            raise HTTPException(500, f"the stored result of job {job_id} fails its checksum; it is not served")
        media = "application/gzip" if format == "nifti" else "application/dicom"
        return FileResponse(path, media_type=media, filename=entry["path"], headers={"Digest": f"sha-256={entry['sha256']}"})

    @app.get("/v1/jobs/{job_id}/report", responses={404: {"model": Problem}, 409: {"model": Problem}},
             summary="Volumes per label (mL), QA, timings per stage, model version and the result's checksum")
    def report(job_id: str, who: Tenant) -> dict:
        finished_job(job_id, who)
        return json.loads((storage.job_dir(job_id) / "output" / "report.json").read_text())

    @app.post("/dicomweb/studies", tags=["DICOMweb"],
              responses={400: {"model": Problem}, 401: {"model": Problem}, 413: {"model": Problem},
                         415: {"model": Problem}, 422: {"model": Problem}},
              summary="DICOMweb STOW-RS: store a study (multipart/related of application/dicom); each series becomes a job",
              description="For PACS and DICOM routers. The job ids come back in the `X-ISL-Jobs` header and as "
                          "RetrieveURL (0008,1190) values; each result is available as DICOM SEG and, when "
                          "`ISL_STOW_URL` is set, pushed there by the worker.")
    async def stow(request: Request, who: Tenant) -> JSONResponse:
        from service.stow import BadRequest, receive_parts
        from service.validate import Invalid, group_series, validate

        room_for_upload()
        root = settings.storage_root / "staging" / uuid.uuid4().hex
        try:
            try:
                await receive_parts(request.stream(), request.headers.get("content-type", ""), root / "parts",
                                    settings.max_upload_bytes)
            except BadRequest as exc:
                raise HTTPException(415 if "Content-Type" in str(exc) or "accepted" in str(exc) else 400, str(exc)) from None
            except OverflowError as exc:
                raise HTTPException(413, str(exc)) from None
            try:
                series, instances = await asyncio.to_thread(group_series, root / "parts")
            except Invalid as exc:
                raise HTTPException(422, f"the study could not be read: {exc}") from None
            if not series:
                raise HTTPException(422, "no DICOM image series among the parts")
            staged = []
            for i, (uid, files) in enumerate(sorted(series.items())):
                folder = root / f"s{i}" / "dicom"
                folder.mkdir(parents=True)
                inputs = []
                for k, f in enumerate(files):
                    dest = folder / f"{k:05d}.dcm"
                    Path(f).rename(dest)
                    inputs.append({"name": f"{uid}/{k:05d}", "kind": "dicom", "path": f"dicom/{dest.name}",
                                   "bytes": dest.stat().st_size, "sha256": storage.sha256(dest)})
                try:
                    await asyncio.to_thread(validate, folder)
                except Invalid as exc:
                    raise HTTPException(422, f"series {uid}: {exc}") from None
                staged.append((root / f"s{i}", inputs))
            options = {"model": settings.default_model, "atlases": None, "priority": 5, "stow": True}
            jobs = [enqueue(who, folder, inputs, options) for folder, inputs in staged]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        urls = [str(request.url_for("get_job", job_id=j["id"])) for j in jobs]
        taken = {f for files in series.values() for f in files}
        ref = lambda cls, inst: {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [inst]}}
        stored = [ref(*instances[f]) for f in sorted(taken) if f in instances]
        failed = [ref(*uids) | {"00081197": {"vr": "US", "Value": [0x0110]}} for f, uids in sorted(instances.items())
                  if f not in taken]  # not an image slice of any series: processing failure (0110H)
        body = {"00081190": {"vr": "UR", "Value": urls}, "00081199": {"vr": "SQ", "Value": stored}}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        return JSONResponse(body, 202 if failed else 200, media_type="application/dicom+json",
                            headers={"X-ISL-Jobs": ",".join(j["id"] for j in jobs)})

    @app.get("/v1/models", summary="Model bundles the workers can run")
    def models(who: Tenant) -> dict:
        return {"default": settings.default_model, "models": _models(settings)}

    @app.get("/openapi.json", summary="This API's OpenAPI schema", include_in_schema=False)
    def openapi(who: Tenant) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/healthz", summary="The process is up")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Redis and storage are reachable", responses={503: {"model": Problem}})
    def readyz() -> JSONResponse:
        checks = {"redis": store.ping(), "storage": storage.reachable()}
        return JSONResponse({"ready": all(checks.values()), **checks}, 200 if all(checks.values()) else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
    def prometheus(who: Tenant) -> Response:
        return PlainTextResponse(metrics.render(store, settings.queue), media_type=metrics.CONTENT_TYPE)

    def openapi_schema() -> dict:
        """FastAPI's schema, with the errors as this API really sends them: every route but the probes may
        answer 401, every error body is a Problem (one sentence, 422 included), uploads may meet 503/507."""
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        problem = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        errors = {"401": "no valid API key (WWW-Authenticate: Bearer)", "422": "the request or its upload is invalid: the reason",
                  "503": "the job queue is unreachable; nothing was queued", "507": "the service's storage is full; nothing was kept"}
        for path, operations in schema["paths"].items():
            for method, op in operations.items():
                codes = [] if path in PROBES else ["401"] + (["503", "507"] if method == "post" else [])
                codes += ["422"] if "422" in op["responses"] else []
                for code in codes:
                    op["responses"][code] = {"description": errors[code], **problem}
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi_schema
    app.state.settings, app.state.store, app.state.storage = settings, store, storage
    return app


def _models(settings: Settings) -> dict[str, dict]:
    out = {}
    for meta in sorted(Path(settings.models_dir).glob("*/bundle.json")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        out[meta.parent.name] = {"version": info.get("version"), "labels": info.get("labels")}
    return out


def _receive(files: list[UploadFile], staging: Path, storage: Storage, limit: int) -> list[dict]:
    """Store the uploaded files under `staging` after sniffing their type from their bytes; refuse what is
    not one NIfTI, one zip, or DICOM files of a series."""
    if not files:
        raise HTTPException(422, "no file uploaded (multipart field 'files')")
    kinds, inputs, total = [], [], 0
    for i, up in enumerate(files):
        head = up.file.read(512)
        up.file.seek(0)
        kind = _sniff(head)
        if kind is None:
            raise HTTPException(422, f"{up.filename!r}: not a NIfTI, DICOM or zip file (judged by its bytes, not its name)")
        kinds.append(kind)
        name = {"nifti-gz": "image.nii.gz", "nifti": "image.nii", "zip": "series.zip"}.get(kind, f"dicom/{i:05d}.dcm")
        try:
            size, digest = storage.write_stream(staging / name, iter(lambda: up.file.read(1 << 20), b""), limit - total)
        except TooLarge:
            raise HTTPException(413, f"upload exceeds the limit of {limit} bytes") from None
        total += size
        inputs.append({"name": up.filename, "kind": kind, "path": name, "bytes": size, "sha256": digest})
    if len(files) > 1 and set(kinds) != {"dicom"}:
        raise HTTPException(422, "several files must all be DICOM files of one series; send a NIfTI or a zip alone")
    from service.validate import Invalid, validate

    target = staging / ("dicom" if kinds[0] == "dicom" else inputs[0]["path"])
    try:
        validate(target)
    except Invalid as exc:
        names = files[0].filename if len(files) == 1 else f"the {len(files)} DICOM files"
        raise HTTPException(422, f"{names!r}: {exc}") from None
    return inputs
