"""How the API answers errors: every error body is a Problem (`{"detail": one sentence}`), 422 included; a full
disk is 507 with nothing kept; Redis or the database away is 503 with Retry-After; 405 lists every method of the
path."""
from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.routes import served

log = logging.getLogger("isl.api")


async def storage_error(request: Request, exc: OSError) -> JSONResponse:
    """A full disk is the client's 507 (try later), nothing half-written stays (staging is removed)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage full: %s", exc)
        return JSONResponse({"detail": "the service's storage is full; nothing was kept, submit again later"}, 507)
    log.exception("storage error")
    return JSONResponse({"detail": "internal storage error; nothing was kept"}, 500)


RETRY_AFTER_S = 5


def unavailable(exc: Exception) -> tuple[int, str, dict[str, str]] | None:
    """A backing service that is away, as the client's 503 with Retry-After (status, detail, headers); None for any
    other error."""
    import redis
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, redis.RedisError):
        what = "the job queue (Redis)"
    elif isinstance(exc, OperationalError | PoolTimeout):  # unreachable, or every connection of the pool stuck
        what = "the service's database"
    else:
        return None
    return 503, f"{what} is unreachable; try again shortly", {"Retry-After": str(RETRY_AFTER_S)}


async def backing_service_error(request: Request, exc: Exception) -> JSONResponse:
    """Redis or the database unreachable while a route needs it: 503 with Retry-After (try again), not a 500."""
    status, detail, headers = unavailable(exc)
    log.error("%s %s: %s (%s)", request.method, request.url.path, detail, exc)
    return JSONResponse({"detail": detail}, status, headers=headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable sentence, as every other error (the Problem schema), not FastAPI's list."""
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'request'}: {e.get('msg', 'invalid')}"
             for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, 422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, OSError):  # the body could not be spooled (a full disk is 507, as any other write)
        return await storage_error(request, exc.__cause__)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Allow: every method of every route on this path, not just the first route's
        allowed = set()
        for route in served():
            match, _ = route.matches({"type": "http", "path": request.url.path, "method": "GET"})
            if match != Match.NONE:
                allowed |= set(getattr(route, "methods", None) or ())
        headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)


def install(app: FastAPI, settings) -> None:
    """The error handlers, and the door every request passes first (service/guard.py: credentials before any body,
    bodies counted and timed)."""
    import redis
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from service.guard import Guard

    app.add_middleware(Guard, settings=settings)
    app.add_exception_handler(OSError, storage_error)
    app.add_exception_handler(OperationalError, backing_service_error)
    app.add_exception_handler(PoolTimeout, backing_service_error)
    app.add_exception_handler(redis.RedisError, backing_service_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
