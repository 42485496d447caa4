"""The door of the API (an ASGI middleware, outside every route): nothing of a request's body is read before its
credentials are checked, and every byte of it is counted and timed as it arrives.

- A request that carries a body to /v1/, /dicomweb/ or /console/ (but the sign-in form) is let in only with a valid
  API key (or, under /console/, a live session): otherwise it is answered 401 (or sent to the sign-in page) from
  its headers alone, so an unauthenticated upload costs no disk and no parsing; an upload while the storage root
  (where its parts are spooled: service/uploads.py) is short of space is answered 507, also unread.
- Bodies are counted as they arrive, chunked or not: past the limit (ISL_MAX_UPLOAD_BYTES for the upload routes,
  ISL_MAX_REQUEST_BYTES for every other) the request is answered 413 at once and the connection closed; a declared
  Content-Length over it is refused before a byte is read.
- An upload that stalls for ISL_BODY_TIMEOUT_S between two chunks, or any other body not whole within it, is
  answered 408 and closed (the request head's timeout is the server's: service/server.py); a response sent before
  its request's body was read closes the connection, so that an unread body cannot hold it open."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from jobstore.errors import STORE_AWAY
from service.auth import Refused, key_in

log = logging.getLogger("isl.api")
UPLOADS = re.compile(r"/v1/(jobs|batches|jobs/[^/]+/correction)|/dicomweb/studies"
                     r"|/console/(jobs|jobs/[^/]+/correction)")
GUARDED = ("/v1/", "/dicomweb/", "/console/")
PUBLIC = frozenset({"/console/sign-in"})
CHECKS, CHECK_S = ThreadPoolExecutor(4, thread_name_prefix="guard"), 6.0  # not the routes' pool, which may be full
CHECKED = "isl_credentials"  # the request state's Caller (API) or console Session the guard found
SLACK = 1 << 20  # multipart boundaries, part headers and form fields around an upload's files
# on every response that does not say otherwise: a tenant's jobs, masks and reports are patients' data, kept by no
# browser or proxy cache
ALWAYS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store"))


class Guard:
    def __init__(self, app, settings):
        self.app, self.settings = app, settings

    def limit(self, method: str, path: str) -> int:
        if method == "POST" and UPLOADS.fullmatch(path):
            return self.settings.max_upload_bytes + SLACK
        return self.settings.max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, path = Headers(scope=scope), scope["path"]
        limit = self.limit(scope["method"], path)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await _answer(send, 413, f"the request body of {length} bytes exceeds the limit of {limit} bytes")
        carries = (length.isdigit() and int(length) > 0) or "transfer-encoding" in headers
        if carries and path.startswith(GUARDED) and path not in PUBLIC:
            if (refusal := await self._admit(scope, headers, limit)) is not None:
                return await _answer(send, *refusal)
        state = {"received": 0, "done": not carries, "answered": False}
        upload, start = limit > self.settings.max_request_bytes, time.monotonic()

        async def counted():
            if state["done"]:
                return await receive()
            # an upload may take long but may not stall; any other body must be whole within the timeout
            wait = self.settings.body_timeout_s - (0 if upload else time.monotonic() - start)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait))
            except TimeoutError:
                return await refuse(408, f"the request body stalled for {self.settings.body_timeout_s:g} s; "
                                         "send it again")
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    return await refuse(413, f"the request body exceeds the limit of {limit} bytes")
                state["done"] = not message.get("more_body", False)
            return message

        async def refuse(status: int, detail: str) -> dict:
            """Answer now (unless the app has begun its response) and tell the app the client is gone."""
            if not state["answered"] and not state.get("started"):
                state["answered"] = True
                await _answer(send, status, detail)
            state["done"] = True
            return {"type": "http.disconnect"}

        async def guarded_send(message):
            if state["answered"]:
                return  # the app's own answer to a body it did not get
            if message["type"] == "http.response.start":
                state["started"] = True
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in ALWAYS if k not in present]
                if not state["done"]:  # answered before its body was read: the rest is not waited for
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        # broad on purpose: whatever the app raised is raised again, unless its answer already went out (a body
        # refused while it arrived: nothing to add)
        except Exception:  # noqa: BLE001
            if not state["answered"]:
                raise
            log.info("%s %s: refused while its body arrived", scope["method"], path)

    async def _admit(self, scope, headers: Headers, limit: int) -> tuple | None:
        """Before any body is read: the credentials (on a thread, within CHECK_S), then the disk for an upload;
        the refusal (status, detail[, headers]) or None."""
        try:
            refusal = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                CHECKS, self._refusal, scope, headers), CHECK_S)
        except TimeoutError:  # Redis and the database both slow to answer: say so rather than wait
            refusal = (503, "the service cannot check credentials now; try again shortly", {"Retry-After": "5"})
        if refusal is None and limit > self.settings.max_request_bytes and (full := self._full()):
            refusal = (507, full)
        return refusal

    def _full(self) -> str:
        """Why an upload cannot be taken now (the storage root, where it is spooled, is short of space), or ''."""
        from fastapi import HTTPException

        from service.intake import room_for_upload

        try:
            room_for_upload(self.settings)
        except HTTPException as exc:
            return exc.detail
        return ""

    def _refusal(self, scope, headers: Headers) -> tuple | None:
        """Why this request may not send its body (status, detail[, headers]), or None: from its headers only."""
        app, state = scope["app"], scope.setdefault("state", {})
        try:  # what is found is kept in the request's state: the route's own dependency does not ask again
            if scope["path"].startswith("/console/"):
                from service.console import SESSION, live_session

                sid = cookie_parser(headers.get("cookie", "")).get(SESSION, "")
                state[CHECKED] = live_session(app, app.state.store, sid)
                if state[CHECKED] is None:
                    return 303, "sign in first", {"Location": "/console/sign-in"}
                return None
            client = scope.get("client")
            state[CHECKED] = app.state.auth.check(key_in(headers), client[0] if client else "unknown")
        except Refused as exc:
            return exc.status, exc.detail, exc.headers
        except STORE_AWAY as exc:  # Redis or the database away: say so, read nothing
            from service.handlers import unavailable

            if (answer := unavailable(exc)) is None:
                raise
            return answer
        return None


async def _answer(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A whole response (a Problem body) that closes the connection: the rest of the body is never read."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close"), *ALWAYS]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
