"""The console's model pages: versions, lineage, which is live, validation figures and loss curves, agreement with
the corrections; and promotion, by the API's own rule (service/actions/models.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from jobstore.errors import STORE_AWAY
from service.actions import models as actions
from service.console.pages import console_router, page, read_json
from service.console.session import Session, Signed, check_csrf
from service.deps import StoreDep
from service.intake import available_models

router = console_router()


def _bundle_meta(settings, name: str) -> dict:
    """The base bundle's bundle.json (its card's figures and lineage); {} when it cannot be read."""
    return read_json(Path(settings.models_dir) / name / "bundle.json") or {}


def _live_meta(settings, store, tenant: str, name: str) -> dict | None:
    """The bundle.json of the retrained version of `name` live for this tenant; None for the base bundle (or when
    the database cannot say)."""
    try:
        live = store.records.live_version(tenant, name) if store.records is not None else None
    except STORE_AWAY:  # the database is away: the page says so elsewhere
        return None
    return None if live is None else read_json(Path(settings.storage_root) / live.folder / "bundle.json")


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: Signed, store: StoreDep):
    listed = actions.models(request.app.state.settings, store, session.tenant)
    return page(request, "models.html", {"session": session, **listed})


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
    settings = request.app.state.settings
    if name not in available_models(settings):
        return page(request, "not_found.html", {"session": session, "what": f"model {name}"}, 404)
    meta = _bundle_meta(settings, name)
    try:
        versions = actions.versions(settings, store, session.tenant, name)
        agreement = actions.agreement(settings, store, session.tenant, name)
    except HTTPException as e:  # no database: the page shows the bundle alone and says why
        versions, agreement, error = None, None, error or e.detail
    trained = _live_meta(settings, store, session.tenant, name) or meta  # the curves of what the tenant runs
    return page(request, "model.html", {
        "session": session, "name": name, "meta": meta, "versions": versions, "agreement": agreement,
        "trained": trained,
        "lineage": (meta.get("transfer") or {}).get("lineage", []), "refinement": meta.get("refinement") or {},
        "error": error, "promoted": promoted,
        "curves": {part: _chart(points)
                   for part, points in ((trained.get("training") or {}).get("curves") or {}).items()}},
        status)


@router.get("/models/{name}/bland-altman.png")
def bland_altman(request: Request, name: str, session: Signed, store: StoreDep):
    png = actions.bland_altman(request.app.state.settings, store, session.tenant, name)
    return Response(png, media_type="image/png")


@router.post("/models/{name}/promote")
def promote(request: Request, name: str, session: Signed, store: StoreDep,
            version: Annotated[str, Form(max_length=128)], csrf: Annotated[str, Form(max_length=100)] = "",
            force: Annotated[bool, Form()] = False, reason: Annotated[str, Form(max_length=2000)] = ""):
    """Make a version live for the caller's tenant, by the API's own rule (a version the rule did not pass needs
    force and a reason); then the model page, saying what happened."""
    check_csrf(session, csrf)
    try:
        actions.promote(request.app.state.settings, store, session.tenant, session.actor, name, version, force,
                        reason)
    except HTTPException as e:
        return _model_page(request, name, session, store, error=f"Not promoted: {e.detail}", status=e.status_code)
    return RedirectResponse(f"/console/models/{quote(name)}?promoted=true", status_code=303)
