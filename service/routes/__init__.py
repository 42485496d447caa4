"""The API's routes, one module per resource; service/app.py includes their routers (without prefixes, so that
a route's path is the path it serves)."""
from __future__ import annotations

from fastapi.routing import APIRoute

from service.routes import audit, batches, corrections, dicomweb, health, jobs, models

ROUTERS = (jobs.router, corrections.router, batches.router, dicomweb.router, models.router, audit.router,
           health.router)


def served() -> list[APIRoute]:
    """Every route of the API, in the order they are matched."""
    return [route for router in ROUTERS for route in router.routes]
