"""How the API answers errors: every error body is a Problem (`{"detail": one sentence}`), 422 included; a full
disk is 507 with nothing kept; 405 lists every method of the path; an upload declaring more than the limit is
refused with 413 before its body is read."""
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


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """The database unreachable while a route needs it: 503 (try again), not a 500."""
    log.error("database unreachable: %s", exc)
    return JSONResponse({"detail": "the service's database is unreachable; try again shortly"}, 503,
                        headers={"Retry-After": "5"})


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable sentence, as every other error (the Problem schema), not FastAPI's list."""
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'request'}: {e.get('msg', 'invalid')}"
             for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, 422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Allow: every method of every route on this path, not just the first route's
        allowed = set()
        for route in served():
            match, _ = route.matches({"type": "http", "path": request.url.path, "method": "GET"})
            if match != Match.NONE:
                allowed |= set(getattr(route, "methods", None) or ())
        headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)


def install(app: FastAPI, max_upload_bytes: int) -> None:
    """The error handlers, and the middleware that refuses a POST declaring a body over the upload limit."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > max_upload_bytes + (1 << 20):
            return JSONResponse({"detail": f"upload of {length} bytes exceeds the limit of {max_upload_bytes}"}, 413)
        return await call_next(request)

    from sqlalchemy.exc import OperationalError

    app.add_exception_handler(OSError, storage_error)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
