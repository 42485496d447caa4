"""The console's operations page, for the operator tenants (ISL_CONSOLE_OPERATORS): workers and what they run,
the queues, retrainings, throughput and failures of every tenant."""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import HTMLResponse

from jobstore.errors import STORE_AWAY
from jobstore.records import JobState
from service.console.pages import console_router, page
from service.console.session import Signed
from service.deps import StoreDep

router = console_router()


def _operators(settings) -> set[str]:
    return {t.strip() for t in settings.console_operators.split(",") if t.strip()}


def _workers(store, now: float) -> tuple[list[dict], list]:
    """Each live worker with its node, device, heartbeat age and the jobs it runs; and the running jobs whose lease
    holder is no live worker (orphans)."""
    running = {}  # lease holder (a worker process) -> the jobs it runs
    for job_id in store.running_jobs():
        if (j := store.get(job_id)) is not None:
            running.setdefault(store.lease_holder(job_id), []).append(j)
    workers = []
    for name, beat in sorted(store.workers().items()):
        info = store.worker_info(name)
        workers.append({"name": name, "node": info.get("node", ""), "device": info.get("device", ""),
                        "age": now - beat, "jobs": running.pop(info.get("holder"), [])})
    return workers, [j for jobs in running.values() for j in jobs]


@router.get("/operations", response_class=HTMLResponse)
def operations(request: Request, session: Signed, store: StoreDep):
    settings = request.app.state.settings
    if session.tenant not in _operators(settings):
        return page(request, "forbidden.html", {"session": session, "what": "the operations page",
                                                "why": "it shows every tenant's workers, queues and failures; "
                                                       "operator tenants are listed in ISL_CONSOLE_OPERATORS"}, 403)
    now = time.time()
    workers, orphans = _workers(store, now)
    try:
        trainings = store.records.active_trainings() if store.records is not None else None
    except STORE_AWAY:  # the database is away: the page says so instead of failing
        trainings = None
    ended = store.ended_since(now - 3600)
    recent = [j for j in ended if j.finished >= now - 600]
    return page(request, "operations.html", {
        "session": session, "workers": workers, "orphans": orphans,
        "queued": store.queue_depth(), "running": store.running_count(), "trainings": trainings,
        "queue": settings.queue, "train_queue": settings.train_queue,
        "ended_10": len(recent), "ended_60": len(ended),
        "succeeded_60": sum(j.state == JobState.SUCCEEDED for j in ended),
        "failures": [j for j in ended if j.state == JobState.FAILED][:20], "events": store.events()})
