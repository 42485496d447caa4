"""The API's FastAPI dependencies, as `Annotated` aliases: the settings, the stores, the queue, the caller's
tenant (API key, revocation included) and the caller's own job (another tenant's job is a 404, exactly as no
job). The application factory (service/app.py) puts the objects they hand out on `app.state`."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from jobstore.records import Batch, Job, JobState
from jobstore.store import JobStore
from service.auth import Refused, key_in
from service.guard import CHECKED
from service.queue import Queue
from service.settings import Settings
from service.storage import JOB_ID, Storage

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="your tenant's API key (or `Authorization: Bearer <key>`)")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[Queue, Depends(get_queue)]


def get_tenant(request: Request, key: Annotated[str | None, Depends(API_KEY)]) -> str:
    """The tenant of the caller's key (X-API-Key or Authorization: Bearer); 401 for none, a wrong or a revoked one;
    429 after too many failures from the caller's address (service/auth.py)."""
    caller = getattr(request.state, CHECKED, None)  # checked already by the guard (a request with a body)
    try:
        caller = caller or request.app.state.auth.check(key_in(request.headers), client_address(request))
    except Refused as exc:
        raise HTTPException(exc.status, exc.detail, headers=exc.headers) from None
    request.state.actor, request.state.key_hash = caller.actor, caller.digest
    return caller.tenant


def client_address(request: Request) -> str:
    """The caller's address (behind a proxy, what uvicorn's --forwarded-allow-ips let it read)."""
    return request.client.host if request.client else "unknown"


Tenant = Annotated[str, Depends(get_tenant)]


def get_actor(request: Request, who: Tenant) -> str:
    return request.state.actor


Actor = Annotated[str, Depends(get_actor)]


def _owned(read, kind: str, record_id: str, who: str):
    """The caller's record `record_id` read by `read`; 404 when there is none or it is another tenant's (the two
    are indistinguishable)."""
    record = read(record_id) if JOB_ID.match(record_id) else None
    if record is None or record.tenant != who:
        raise HTTPException(404, f"no {kind} {record_id}")
    return record


def get_owned_job(job_id: str, who: Tenant, store: StoreDep) -> Job:
    return _owned(lambda i: store.get_owned(i, who), "job", job_id, who)


OwnedJob = Annotated[Job, Depends(get_owned_job)]


def succeeded(job: Job) -> Job:
    """The job, once it has succeeded (its results exist); 409 before; 410 once the retention policy deleted them."""
    if job.state != JobState.SUCCEEDED:
        raise HTTPException(409, f"job {job.id} is {job.state}; results exist once it has succeeded")
    if job.purged is not None:
        when = datetime.fromtimestamp(job.purged, UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise HTTPException(410, f"the input and results of job {job.id} were deleted on {when} by the retention "
                                 "policy (ISL_RETENTION_DAYS); its record and audit trail are kept")
    return job


def get_finished_job(job: OwnedJob) -> Job:
    """The caller's job once it has succeeded; 404 as for OwnedJob, 409 before it has succeeded."""
    return succeeded(job)


FinishedJob = Annotated[Job, Depends(get_finished_job)]


def get_owned_batch(batch_id: str, who: Tenant, store: StoreDep) -> Batch:
    return _owned(store.get_batch, "batch", batch_id, who)


OwnedBatch = Annotated[Batch, Depends(get_owned_batch)]
