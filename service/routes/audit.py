"""/v1/audit: the caller's tenant's audit trail (who submitted, downloaded, cancelled, corrected, and what the
retention policy deleted, when), read from the database."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from service.deps import StoreDep, Tenant
from service.views import Problem

router = APIRouter()
ACTIONS = ("submit", "download", "cancel", "correct", "retrain", "promote", "purge", "sign_in", "sign_out")


class AuditEventView(BaseModel):
    at: float = Field(description="when (Unix seconds)")
    actor: str = Field(description="who: key:<first 12 hex digits of the API key's sha256>, dimse (the DICOM "
                                   "listener), retention (the retention policy) or rule (the promotion rule)")
    action: str = Field(description="submit, download, cancel, correct, retrain, promote, purge, or a web console "
                                    "sign_in or sign_out")
    job_id: str | None = Field(None, description="the job it concerns")
    detail: dict[str, Any] = Field(default_factory=dict, description="what else was recorded: model and size of a "
                                                                     "submission, format and checksum of a download")


class AuditList(BaseModel):
    events: list[AuditEventView] = Field(description="this page, oldest first")
    total: int = Field(description="events matching the filters")
    offset: int
    limit: int


@router.get("/v1/audit", response_model=AuditList, responses={401: {"model": Problem}, 503: {"model": Problem}},
            summary="Your tenant's audit trail, oldest first; filter by job, action and time")
def audit(who: Tenant, store: StoreDep,
          job_id: Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$", description="one job's events")] = None,
          action: Annotated[str | None, Query(pattern="^(" + "|".join(ACTIONS) + ")$")] = None,
          since: Annotated[float | None, Query(ge=0, le=32503680000,
                                               description="events at or after (Unix seconds)")] = None,
          offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AuditList:
    if store.records is None:
        raise HTTPException(503, "this service keeps no database; there is no audit trail")
    events, total = store.records.trail(who, job_id=job_id, action=action, since=since, offset=offset, limit=limit)
    return AuditList(events=[AuditEventView.model_validate(e, from_attributes=True) for e in events], total=total,
                     offset=offset, limit=limit)
