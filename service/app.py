"""The FastAPI application: upload a scan, follow its job, fetch the refined mask and its report.

It validates, stores and queues; the GPU workers (`isl worker`) do the work. Never imports torch. This module
only wires: settings, stores, routers (service/routes/, one per resource, over service/deps.py), error handlers
(service/handlers.py) and the OpenAPI schema (service/openapi.py)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from jobstore.store import open_store
from service import console, handlers, openapi
from service.auth import Keys
from service.queue import Queue
from service.routes import ROUTERS
from service.settings import Settings
from service.storage import Storage
from service.uploads import spool_under

DESCRIPTION = ("Upload a 3D scan; a GPU worker refines its segmentation by inference-specific learning; fetch the "
               "mask (NIfTI or DICOM SEG) and a report with volumes per label.")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="ISL refinement service", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description=DESCRIPTION)
    app.state.settings = settings
    app.state.keys = settings.tenants_by_key_hash()  # refuses to start without keys unless in development mode
    app.state.store = open_store(settings.redis_url, settings.database(), patient=False)
    app.state.auth = Keys(app.state.keys, app.state.store, settings)
    app.state.storage = Storage(settings.storage_root)
    spool_under(Path(settings.storage_root) / "spool")
    app.state.queue = Queue(settings, patient=False)
    for router in ROUTERS:
        app.include_router(router)
    handlers.install(app, settings)
    console.install(app)
    app.openapi = lambda: openapi.schema_of(app)
    return app
