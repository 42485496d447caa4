"""The web console: server-rendered pages (Jinja2, no build step) for operators and radiologists, served by the API
process, which still never imports torch.

Sign-in takes a tenant's API key once and opens a session: a random id in an HttpOnly, SameSite=Strict cookie
scoped to /console, of which Redis keeps only a digest (service/jobs.py), for ISL_CONSOLE_SESSION_HOURS. Every
request re-checks the key behind the session, so revoking a key (or removing it from ISL_API_KEYS) signs its
sessions out at once. Every form carries the session's CSRF token (sign-in, before any session, a token in a
cookie of its own, the double-submit pattern); a post without it is refused with 403. A tenant sees its own jobs
only, exactly as through the API: another tenant's job is a 404, as no job."""
from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from service.auth import Refused, key_actor
from service.deps import StoreDep, client_address, succeeded
from service.guard import CHECKED
from service.intake import available_models
from service.records import FINAL, JobState
from service.storage import JOB_ID
from service.views import job_view


class _Timed(APIRoute):
    """Every console response says the server's time for it (session, records and rendering) in its Server-Timing
    header, `render;dur=<ms>`: what the 300 ms budget of a page is measured on (for the event stream, until it
    starts)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def timed(request: Request) -> Response:
            t0 = time.perf_counter()
            request.state.csp_nonce = secrets.token_urlsafe(16)
            response = await handler(request)
            response.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - t0) * 1000:.1f}"
            response.headers.update(security_headers(request.state.csp_nonce))
            return response

        return timed


def security_headers(nonce: str) -> dict[str, str]:
    """What every console response carries: scripts and styles of this response only (its nonce), nothing from
    elsewhere, never framed (clickjacking), types as declared, no referrer leaving the site; pages of patients are
    not kept by the browser or a proxy (a page's back button after sign-out asks the server again)."""
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self'; "
           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


router = APIRouter(prefix="/console", include_in_schema=False, route_class=_Timed)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
SESSION, SIGNIN = "isl_session", "isl_signin"
PAGE = 50


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else ""


def _duration(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


templates.env.filters["when"] = _when
templates.env.filters["duration"] = _duration


class SignedOut(Exception):
    """No live session: pages redirect to the sign-in page."""


@dataclass(frozen=True)
class Session:
    id: str
    tenant: str
    csrf: str
    key_hash: str


def _secure(request: Request) -> bool:
    return request.app.state.settings.console_secure_cookie or request.url.scheme == "https"


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True, samesite="strict",
                        secure=_secure(request))


def live_session(app, store, sid: str) -> Session | None:
    """The live session of id `sid`, its key still valid; None otherwise (a session of a revoked key is closed)."""
    record = store.session(sid)
    if record is None:
        return None
    digest = record["key_hash"]
    if app.state.keys.get(digest) != record["tenant"] or store.revoked(digest):
        store.close_session(sid)
        return None
    return Session(sid, record["tenant"], record["csrf"], digest)


def get_session(request: Request, store: StoreDep) -> Session:
    """The caller's live session, its key still valid; SignedOut otherwise."""
    session = getattr(request.state, CHECKED, None)  # checked already by the guard (a post with a body)
    session = session or live_session(request.app, store, request.cookies.get(SESSION, ""))
    if session is None:
        raise SignedOut
    return session


Signed = Annotated[Session, Depends(get_session)]


def check_csrf(session: Session, token: str) -> None:
    if not token or not hmac.compare_digest(token, session.csrf):
        raise HTTPException(403, "this form was not sent from a console page of this session (its CSRF token is "
                                 "missing or wrong): reload the page and send it again")


def _page(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def install(app) -> None:
    """Include the console's routes and send a signed-out browser to the sign-in page."""
    app.include_router(router)

    @app.exception_handler(SignedOut)
    async def _signed_out(request: Request, exc: SignedOut):
        to = "/console/sign-in"
        if request.method == "GET" and request.url.path not in ("/console", "/console/"):
            to += "?" + urlencode({"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")})
        response = RedirectResponse(to, status_code=303)
        response.delete_cookie(SESSION, path="/console")
        return response


def _sign_in_page(request: Request, error: str = "", status: int = 200, next_: str = "") -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = _page(request, "sign_in.html", {"csrf": token, "error": error, "next": next_}, status)
    _cookie(response, request, SIGNIN, token, 3600)
    return response


def _local(path: str) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    return path if path.startswith("/console/") and not path.startswith("//") else "/console/jobs"


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_form(request: Request, next: str = "") -> HTMLResponse:
    return _sign_in_page(request, next_=_local(next) if next else "")


@router.post("/sign-in")
def sign_in(request: Request, store: StoreDep, key: Annotated[str, Form(max_length=512)] = "",
            csrf: Annotated[str, Form(max_length=100)] = "", next: Annotated[str, Form(max_length=2000)] = ""):
    expected = request.cookies.get(SIGNIN, "")
    if not csrf or not expected or not hmac.compare_digest(csrf, expected):
        raise HTTPException(403, "the sign-in form was not sent from this console's sign-in page (its CSRF token is "
                                 "missing or wrong): reload the page and sign in again")
    try:
        caller = request.app.state.auth.check(key or None, client_address(request), via="console")
    except Refused as exc:
        why = exc.detail if exc.status == 429 else ("That API key is not valid (unknown, or revoked). Ask your "
                                                    "administrator for your tenant's key.")
        page = _sign_in_page(request, why, exc.status, _local(next) if next else "")
        page.headers.update({k: v for k, v in exc.headers.items() if k == "Retry-After"})
        return page
    tenant, digest = caller.tenant, caller.digest
    settings = request.app.state.settings
    ttl = int(settings.console_session_hours * 3600)
    sid, _ = store.open_session(tenant, digest, ttl)
    store.audit(tenant, key_actor(digest), "sign_in", detail={"via": "console"})
    response = RedirectResponse(_local(next), status_code=303)
    _cookie(response, request, SESSION, sid, ttl)
    response.delete_cookie(SIGNIN, path="/console")
    return response


@router.post("/sign-out")
def sign_out(session: Signed, store: StoreDep, csrf: Annotated[str, Form(max_length=100)] = ""):
    check_csrf(session, csrf)
    store.close_session(session.id)
    store.audit(session.tenant, key_actor(session.key_hash), "sign_out", detail={"via": "console"})
    response = RedirectResponse("/console/sign-in", status_code=303)
    response.delete_cookie(SESSION, path="/console")
    return response


@router.get("", include_in_schema=False)
@router.get("/", include_in_schema=False)
def home(session: Signed) -> RedirectResponse:
    return RedirectResponse("/console/jobs", status_code=303)


STATES = [s.value for s in JobState]


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, session: Signed, store: StoreDep,
         state: Annotated[str, Query(max_length=20)] = "", page: Annotated[int, Query(ge=1, le=100000)] = 1):
    return _jobs_page(request, session, store, state, page)


def _jobs_page(request: Request, session: Session, store, state: str = "", page: int = 1, error: str = "",
               status: int = 200) -> HTMLResponse:
    """The job list; `error` (a refused upload's reason) shown above it, with the refusal's status."""
    if state and state not in STATES:
        raise HTTPException(422, f"state {state!r} is none of {', '.join(STATES)}")
    rows, total, offset = [], 0, (page - 1) * PAGE
    if state:  # a filter reads the tenant's jobs page by page until this page of matches is full
        seen, start, chunk = 0, 0, 500
        while len(rows) < PAGE:
            batch, total_all = store.list(session.tenant, start, chunk)
            for job in batch:
                if job.state == state:
                    if seen >= offset and len(rows) < PAGE:
                        rows.append(job)
                    seen += 1
            start += chunk
            if start >= total_all:
                break
        total = None
    else:
        rows, total = store.list(session.tenant, offset, PAGE)
    views = [job_view(j, store) for j in rows]
    response = _page(request, "jobs.html", {
        "session": session, "jobs": views, "state": state, "states": STATES, "page": page, "total": total,
        "more": (total is None and len(views) == PAGE) or (total is not None and offset + PAGE < total),
        "models": sorted(available_models(request.app.state.settings)),
        "default_model": request.app.state.settings.default_model, "error": error}, status)
    return response


def _read_json(path: Path) -> dict | None:
    """A JSON file of the job's output, or None when it cannot be read (the page then says so)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@router.post("/jobs")
def upload(request: Request, session: Signed, store: StoreDep,
           files: Annotated[list[UploadFile], File()], csrf: Annotated[str, Form(max_length=100)] = "",
           model: Annotated[str, Form(max_length=200)] = ""):
    """A scan (or a DICOM series, or one file per sequence) uploaded from the browser, taken in exactly as by
    POST /v1/jobs; then its job page (a refusal: the job list with the reason)."""
    from service.routes import jobs as api

    check_csrf(session, csrf)
    app = request.app
    try:
        view = api.submit(session.tenant, key_actor(session.key_hash), Response(), app.state.settings, store,
                          app.state.storage, app.state.queue, files, model or None)
    except HTTPException as e:
        return _jobs_page(request, session, store, error=f"The upload was refused: {e.detail}", status=e.status_code)
    return RedirectResponse(f"/console/jobs/{view.id}", status_code=303)


@router.post("/jobs/{job_id}/correction")
def correction(request: Request, job_id: str, session: Signed, store: StoreDep,
               file: Annotated[UploadFile, File()], csrf: Annotated[str, Form(max_length=100)] = "",
               note: Annotated[str, Form(max_length=2000)] = ""):
    """A radiologist's corrected mask of the caller's finished job, taken in exactly as by
    POST /v1/jobs/{id}/correction; then the job page, which lists it (or says why it was refused)."""
    from service.routes import corrections as api

    check_csrf(session, csrf)
    record = _owned(store, job_id, session)
    app = request.app
    try:
        api.correct(succeeded(record), key_actor(session.key_hash), Response(), app.state.settings, store,
                    app.state.storage, file, note)
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
        return _page(request, "not_found.html", {"session": session, "what": f"job {job_id}"}, 404)
    done = record.state == JobState.SUCCEEDED and record.purged is None
    output = request.app.state.storage.job_dir(record.id) / "output"
    report = _read_json(output / "report.json") if done else None
    preview = _read_json(output / "preview" / "preview.json") if done else None
    corrections = _corrections(store, record) if done else []
    return _page(request, "job.html", {"session": session, "job": job_view(record, store), "record": record,
                                       "report": report, "preview": preview, "corrections": corrections,
                                       "error": error, "corrected": corrected},
                 status)


def _corrections(store, record) -> list[dict]:
    """The corrections of a job, oldest first ([] without a database, or while it is away: the page says none)."""
    if store.records is None:
        return []
    try:
        return store.records.corrections(record.tenant, job_id=record.id)
    except Exception:  # noqa: BLE001 - the database away: the page still shows the job
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
    from service.routes import jobs as api

    record = _owned(store, job_id, session)
    storage, actor = request.app.state.storage, key_actor(session.key_hash)
    if kind != "report":
        return api.result(record, storage, store, actor, kind)
    body = api.report(succeeded(record), storage, store, actor)
    return Response(json.dumps(body, indent=2), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="report-{record.id}.json"'})


@router.get("/events")
async def events(request: Request, session: Signed, store: StoreDep,
                 ids: Annotated[str, Query(max_length=PAGE * 33)] = ""):
    """Server-sent events for the pages: one `job` event (a JobView) per change of any of the caller's jobs `ids`
    (comma-separated), until all are final. One connection for a whole page: browsers allow few per host."""
    wanted = [i for i in ids.split(",") if JOB_ID.match(i)][:PAGE]
    owned = [i for i in wanted if (j := store.get_owned(i, session.tenant)) is not None and j.tenant == session.tenant]
    return StreamingResponse(_stream(owned, store, request, session.id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


async def _stream(job_ids: list[str], store, request: Request, sid: str):
    """Until every job is final, the browser leaves, or the session ends (signed out, its key revoked)."""
    last: dict[str, str] = {}
    idle, live = 0.0, list(job_ids)
    while live and not await request.is_disconnected():
        if await asyncio.to_thread(live_session, request.app, store, sid) is None:
            break
        for job_id in list(live):
            current = await asyncio.to_thread(store.get, job_id)
            if current is None:
                live.remove(job_id)
                continue
            payload = job_view(current, store).model_dump_json()
            if payload != last.get(job_id):
                last[job_id], idle = payload, 0.0
                yield f"event: job\ndata: {payload}\n\n"
            if current.state in FINAL:
                live.remove(job_id)
        if idle >= 15:
            idle = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.5)
        idle += 0.5
    yield "event: end\ndata: {}\n\n"


PREVIEW_FILE = re.compile(r"(axial|coronal|sagittal)_\d{2}\.png")


@router.get("/jobs/{job_id}/preview/{name}")
def preview_image(request: Request, job_id: str, name: str, session: Signed, store: StoreDep) -> FileResponse:
    """One preview slice of the caller's own finished job (404 for another tenant's, as for no job)."""
    _owned(store, job_id, session)
    path = request.app.state.storage.job_dir(job_id) / "output" / "preview" / name
    if not PREVIEW_FILE.fullmatch(name) or not path.is_file():
        raise HTTPException(404, f"no preview image {name} of job {job_id}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})  # a patient's image


# -- models: versions, lineage, which is live, validation figures, agreement with the corrections; promotion -------
def _bundle_meta(settings, name: str) -> dict:
    """The base bundle's bundle.json (its card's figures and lineage); {} when it cannot be read."""
    return _read_json(Path(settings.models_dir) / name / "bundle.json") or {}


def _live_meta(settings, store, tenant: str, name: str) -> dict | None:
    """The bundle.json of the retrained version of `name` live for this tenant; None for the base bundle (or when
    the database cannot say)."""
    try:
        live = store.records.live_version(tenant, name) if store.records is not None else None
    except Exception:  # noqa: BLE001 - the database is away: the page says so elsewhere
        return None
    return None if live is None else _read_json(Path(settings.storage_root) / live["folder"] / "bundle.json")


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: Signed, store: StoreDep):
    from service.routes import models as api

    listed = api.models(session.tenant, request.app.state.settings, store)
    return _page(request, "models.html", {"session": session, **listed})


def _chart(points: list, width: int = 360, height: int = 160, pad: int = 36) -> dict | None:
    """A loss curve ([iteration, loss] pairs from the bundle) as an SVG polyline in a width x height box: the
    points string and the axes' end values, for the models page (drawn by the browser, no plotting library)."""
    if not points or len(points) < 2:
        return None
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    x0, x1, y0, y1 = 0.0, max(xs), min(ys), max(ys)
    span_y = (y1 - y0) or 1.0

    def at(x, y):
        return (f"{pad + (x - x0) / ((x1 - x0) or 1.0) * (width - pad - 8):.1f},"
                f"{8 + (y1 - y) / span_y * (height - pad - 8):.1f}")

    return {"points": " ".join(at(x, y) for x, y in zip(xs, ys)), "width": width, "height": height, "pad": pad,
            "iterations": int(x1), "first": ys[0], "last": ys[-1], "low": y0, "high": y1}


@router.get("/models/{name}", response_class=HTMLResponse)
def model_page(request: Request, name: str, session: Signed, store: StoreDep,
               promoted: Annotated[bool, Query()] = False):
    return _model_page(request, name, session, store, promoted=promoted)


def _model_page(request: Request, name: str, session: Session, store, error: str = "", status: int = 200,
                promoted: bool = False) -> HTMLResponse:
    """A model's page; `error` (a refused promotion's reason) at its top; `promoted`: say which version is live."""
    from service.routes import models as api

    settings = request.app.state.settings
    if name not in available_models(settings):
        return _page(request, "not_found.html", {"session": session, "what": f"model {name}"}, 404)
    meta = _bundle_meta(settings, name)
    try:
        versions = api.versions(name, session.tenant, settings, store)
        agreement = api.model_agreement(name, session.tenant, settings, store)
    except HTTPException as e:  # no database: the page shows the bundle alone and says why
        versions, agreement, error = None, None, error or e.detail
    trained = _live_meta(settings, store, session.tenant, name) or meta  # the curves of what the tenant runs
    return _page(request, "model.html", {
        "session": session, "name": name, "meta": meta, "versions": versions, "agreement": agreement,
        "trained": trained,
        "lineage": (meta.get("transfer") or {}).get("lineage", []), "refinement": meta.get("refinement") or {},
        "error": error, "promoted": promoted,
        "curves": {part: _chart(points)
                   for part, points in ((trained.get("training") or {}).get("curves") or {}).items()}},
        status)


@router.get("/models/{name}/bland-altman.png")
def bland_altman(request: Request, name: str, session: Signed, store: StoreDep):
    from service.routes import models as api

    return api.model_agreement(name, session.tenant, request.app.state.settings, store, format="png")


@router.post("/models/{name}/promote")
def promote(request: Request, name: str, session: Signed, store: StoreDep,
            version: Annotated[str, Form(max_length=128)], csrf: Annotated[str, Form(max_length=100)] = "",
            force: Annotated[bool, Form()] = False, reason: Annotated[str, Form(max_length=2000)] = ""):
    """Make a version live for the caller's tenant, by the API's own rule (a version the rule did not pass needs
    force and a reason); then the model page, saying what happened."""
    from service.routes import models as api

    check_csrf(session, csrf)
    try:
        api.promote(name, api.Promotion(version=version, force=force, reason=reason), session.tenant,
                    key_actor(session.key_hash), request.app.state.settings, store)
    except HTTPException as e:
        return _model_page(request, name, session, store, error=f"Not promoted: {e.detail}", status=e.status_code)
    return RedirectResponse(f"/console/models/{quote(name)}?promoted=true", status_code=303)


# -- operations: workers, queues, throughput and failures of every tenant, for the operator tenants ---------------
def _operators(settings) -> set[str]:
    return {t.strip() for t in settings.console_operators.split(",") if t.strip()}


@router.get("/operations", response_class=HTMLResponse)
def operations(request: Request, session: Signed, store: StoreDep):
    settings = request.app.state.settings
    if session.tenant not in _operators(settings):
        return _page(request, "forbidden.html", {"session": session, "what": "the operations page",
                                                 "why": "it shows every tenant's workers, queues and failures; "
                                                        "operator tenants are listed in ISL_CONSOLE_OPERATORS"}, 403)
    now = time.time()
    running = {}  # lease holder (a worker process) -> the jobs it runs
    for job_id in store.running_jobs():
        if (j := store.get(job_id)) is not None:
            running.setdefault(store.lease_holder(job_id), []).append(j)
    workers = []
    for name, beat in sorted(store.workers().items()):
        info = store.worker_info(name)
        workers.append({"name": name, "node": info.get("node", ""), "device": info.get("device", ""),
                        "age": now - beat, "jobs": running.pop(info.get("holder"), [])})
    try:
        trainings = store.records.active_trainings() if store.records is not None else None
    except Exception:  # noqa: BLE001 - the database is away: the page says so instead of failing
        trainings = None
    ended = store.ended_since(now - 3600)
    recent = [j for j in ended if j.finished >= now - 600]
    response = _page(request, "operations.html", {
        "session": session, "workers": workers, "orphans": [j for jobs in running.values() for j in jobs],
        "queued": store.queue_depth(), "running": store.running_count(), "trainings": trainings,
        "queue": settings.queue, "train_queue": settings.train_queue,
        "ended_10": len(recent), "ended_60": len(ended),
        "succeeded_60": sum(j.state == JobState.SUCCEEDED for j in ended),
        "failures": [j for j in ended if j.state == JobState.FAILED][:20], "events": store.events()})
    return response
