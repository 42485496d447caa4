"""The OpenAPI schema as this API really answers: every route but the probes may answer 401, every error body is
a Problem (one sentence, 422 included), uploads may meet 503 and 507, and a body (multipart or JSON) that cannot be
parsed 400."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.routes.health import PROBES

PROBLEM = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
ERRORS = {"400": "the body (multipart or JSON) cannot be parsed",
          "401": "no valid API key (WWW-Authenticate: Bearer)",
          "422": "the request or its upload is invalid: the reason",
          "503": "the job queue is unreachable; nothing was queued",
          "507": "the service's storage is full; nothing was kept"}


def schema_of(app: FastAPI) -> dict:
    """FastAPI's schema of `app` with the errors as sent, made once and kept (install as `app.openapi`)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            codes = [] if path in PROBES else ["401"] + (["503", "507"] if method == "post" else [])
            codes += ["422"] if "422" in op["responses"] else []
            body = op.get("requestBody", {}).get("content", {})
            codes += ["400"] if body and "400" not in op["responses"] else []
            for code in codes:
                op["responses"][code] = {"description": ERRORS[code], **PROBLEM}
    for unused in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(unused, None)
    app.openapi_schema = schema
    return schema
