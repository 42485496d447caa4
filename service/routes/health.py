"""Probes, metrics and the schema: /healthz and /readyz (the only routes without credentials), /metrics
(Prometheus) and /openapi.json."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

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


@router.get("/healthz", summary="The process is up (asks no backing service and no thread)")
async def healthz() -> dict:
    return {"status": "ok"}


PROBE_S = 3.0
# each probe on a thread of its own, not the routes' pool: a backing service that hangs holds its own probe only
_PROBES: dict[str, ThreadPoolExecutor] = {}
_RUNNING: dict[str, asyncio.Future] = {}


@router.get("/readyz", summary="Redis, the database and storage are reachable (each asked for at most 3 s)",
            responses={503: {"model": Problem}})
async def readyz(store: StoreDep, storage: StorageDep) -> JSONResponse:
    probes = {"redis": store.ping, "database": (lambda: True) if store.records is None else store.records.ping,
              "storage": storage.reachable}
    answers = await asyncio.gather(*(_probe(name, check) for name, check in probes.items()))
    checks = dict(zip(probes, answers))
    down = [name for name, ok in checks.items() if not ok]
    return JSONResponse({"ready": not down, **checks, "down": down}, 503 if down else 200)


async def _probe(name: str, check) -> bool:
    """`check()` within PROBE_S; False when it fails, takes longer, or an earlier call of it has not returned."""
    if (running := _RUNNING.get(name)) is not None and not running.done():
        return False
    pool = _PROBES.setdefault(name, ThreadPoolExecutor(1, thread_name_prefix=f"readyz-{name}"))
    future = _RUNNING[name] = asyncio.get_running_loop().run_in_executor(pool, check)
    try:
        return bool(await asyncio.wait_for(asyncio.shield(future), PROBE_S))
    except Exception:  # noqa: BLE001 - a probe that fails or takes too long: that service is down
        return False


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
def prometheus(who: Tenant, store: StoreDep, settings: SettingsDep) -> Response:
    return PlainTextResponse(metrics.render(store, settings.queue), media_type=metrics.CONTENT_TYPE)
