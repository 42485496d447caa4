"""Jobs followed as server-sent events: the one poller behind GET /v1/jobs/{id}/events (one job, while its key is
valid) and the console's GET /console/events (a page's jobs, while its session is live)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request

from jobstore.records import FINAL
from jobstore.store import JobStore
from service.views import job_view

POLL_S, KEEP_ALIVE_S = 0.5, 15.0


def _end(data: dict) -> str:
    return f"event: end\ndata: {json.dumps(data)}\n\n"


async def job_events(store: JobStore, job_ids: list[str], request: Request, refused: Callable[[], dict | None],
                     end: dict | None = None) -> AsyncIterator[str]:
    """One `job` event (a JobView) per change of any of `job_ids`, and a keep-alive comment after 15 s without
    one, until every job is final (or gone) or the client leaves; then an `end` event with `end` as its data
    (none when `end` is None). `refused()` (called on a thread before each poll) gives the data of the `end` event
    that stops the stream at once (a revoked key, a closed session), or None while it may go on."""
    last: dict[str, str] = {}
    idle, live = 0.0, list(job_ids)
    while live and not await request.is_disconnected():
        if (why := await asyncio.to_thread(refused)) is not None:
            yield _end(why)
            return
        for job_id in list(live):
            current = await asyncio.to_thread(store.get, job_id)
            payload = None if current is None else job_view(current, store).model_dump_json()
            if payload is not None and payload != last.get(job_id):
                last[job_id], idle = payload, 0.0
                yield f"event: job\ndata: {payload}\n\n"
            if current is None or current.state in FINAL:
                live.remove(job_id)
        if not live:
            break
        if idle >= KEEP_ALIVE_S:
            idle = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_S)
        idle += POLL_S
    if end is not None:
        yield _end(end)
