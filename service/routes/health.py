"""Probes, metrics and the schema: /healthz and /readyz (the only routes without credentials), /metrics
(Prometheus) and /openapi.json."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service import metrics
from service.deps import SettingsDep, StorageDep, StoreDep, Tenant
from service.views import Problem

router = APIRouter()
PROBES = ("/healthz", "/readyz")


@router.get("/openapi.json", summary="This API's OpenAPI schema", include_in_schema=False)
def openapi(who: Tenant, request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/healthz", summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis, the database and storage are reachable", responses={503: {"model": Problem}})
def readyz(store: StoreDep, storage: StorageDep) -> JSONResponse:
    checks = {"redis": store.ping(), "database": store.records is None or store.records.ping(),
              "storage": storage.reachable()}
    return JSONResponse({"ready": all(checks.values()), **checks}, 200 if all(checks.values()) else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
def prometheus(who: Tenant, store: StoreDep, settings: SettingsDep) -> Response:
    return PlainTextResponse(metrics.render(store, settings.queue), media_type=metrics.CONTENT_TYPE)
