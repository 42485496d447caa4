"""Signing in and out of the console, and the session every other page asks for.

Sign-in takes a tenant's API key once and opens a session: a random id in an HttpOnly, SameSite=Strict cookie
scoped to /console, of which Redis keeps only a digest (jobstore/keys.py), for ISL_CONSOLE_SESSION_HOURS. Every
request re-checks the key behind the session, so revoking a key (or removing it from ISL_API_KEYS) signs its
sessions out at once. Every form carries the session's CSRF token (sign-in, before any session, a token in a
cookie of its own, the double-submit pattern); a post without it is refused with 403."""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.auth import Refused, key_actor
from service.console.pages import console_router, page
from service.deps import StoreDep, client_address
from service.guard import CHECKED

router = console_router()
SESSION, SIGNIN = "isl_session", "isl_signin"


class SignedOut(Exception):
    """No live session: pages redirect to the sign-in page."""


@dataclass(frozen=True)
class Session:
    id: str
    tenant: str
    csrf: str
    key_hash: str

    @property
    def actor(self) -> str:
        """Who acts in the audit trail: the key that signed in."""
        return key_actor(self.key_hash)


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


async def signed_out(request: Request, exc: SignedOut) -> RedirectResponse:
    """A signed-out browser goes to the sign-in page, and from there back to the page it asked for."""
    to = "/console/sign-in"
    if request.method == "GET" and request.url.path not in ("/console", "/console/"):
        to += "?" + urlencode({"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")})
    response = RedirectResponse(to, status_code=303)
    response.delete_cookie(SESSION, path="/console")
    return response


def _sign_in_page(request: Request, error: str = "", status: int = 200, next_: str = "") -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = page(request, "sign_in.html", {"csrf": token, "error": error, "next": next_}, status)
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
        refused = _sign_in_page(request, why, exc.status, _local(next) if next else "")
        refused.headers.update({k: v for k, v in exc.headers.items() if k == "Retry-After"})
        return refused
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
    store.audit(session.tenant, session.actor, "sign_out", detail={"via": "console"})
    response = RedirectResponse("/console/sign-in", status_code=303)
    response.delete_cookie(SESSION, path="/console")
    return response


@router.get("", include_in_schema=False)
@router.get("/", include_in_schema=False)
def home(session: Signed) -> RedirectResponse:
    return RedirectResponse("/console/jobs", status_code=303)
