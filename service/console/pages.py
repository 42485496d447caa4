"""How a console page is made: the routers' timing and security headers, the Jinja2 templates and their filters."""
from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

PAGE = 50  # jobs per page of the job list, and at most as many followed by one event stream


class Timed(APIRoute):
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


def console_router() -> APIRouter:
    """A router of console pages: under /console, out of the API's schema, each response timed and secured."""
    return APIRouter(prefix="/console", include_in_schema=False, route_class=Timed)


templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else ""


def _duration(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


templates.env.filters["when"] = _when
templates.env.filters["duration"] = _duration


def page(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def read_json(path: Path) -> dict | None:
    """A JSON file of a job's output or of a bundle, or None when it cannot be read (the page then says so)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
