"""What a client sees of jobs and batches (the response models of the API), made from the stored records."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from jobstore.records import FINAL, Batch, Job, JobState
from jobstore.store import JobStore

# the states as a plain string enum in the schema (documented inline in JobView, as they always were)
State = Literal[tuple(s.value for s in JobState)]


class JobView(BaseModel):
    """What a client sees of a job."""

    id: str = Field(description="job id (32 hex digits)")
    state: State = Field(description="where the job is")
    queue_position: int | None = Field(None, description="0-based place in the queue while queued")
    estimated_wait_s: float | None = Field(None, description="while queued: seconds until a worker should take it, "
                                                             "from the live workers, the running jobs and the mean of "
                                                             "recent job durations")
    stage: str = Field("", description="engine stage while running: baseline, registration, finetune, fusion, final, "
                                       "writing")
    progress: float = Field(0.0, description="0..1 while running; 1 when succeeded")
    error: str = Field("", description="why it failed, in words a person can act on")
    model: str = Field(description="model bundle that refines it")
    worker: str = Field("", description="the worker node that ran (or runs) it")
    push: str = Field("", description="for jobs whose results are sent on (DICOMweb with ISL_STOW_URL set, DIMSE "
                                      "with a destination): 'ok', or why sending them failed")
    received_by: Literal["upload", "dicomweb", "dimse"] = Field("upload", description="how its input came: an "
                                                                "upload (/v1/jobs, batches), STOW-RS or C-STORE")
    input_files: int = Field(0, description="files of its input as received: DICOM instances, or 1 for a NIfTI "
                                            "scan or a zip")
    created: float = Field(description="when it was accepted (Unix seconds)")
    started: float | None = Field(None, description="when a worker took it (Unix seconds)")
    finished: float | None = Field(None, description="when it ended (Unix seconds)")
    purged: float | None = Field(None, description="when the retention policy deleted its input and results (Unix "
                                                   "seconds); its record stays")
    links: dict[str, str] = Field(default_factory=dict, description="related URLs: self, events, result, report")


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="this page, newest first")
    total: int = Field(description="all of the caller's jobs")
    offset: int = Field(description="index of the first job of this page")
    limit: int = Field(description="page size")


class BatchView(BaseModel):
    id: str = Field(description="batch id")
    created: float = Field(description="when it was accepted (Unix seconds)")
    counts: dict[str, int] = Field(description="jobs per state")
    done: bool = Field(description="every job has ended (succeeded, failed or cancelled)")
    jobs: list[JobView] = Field(description="its jobs, in upload order")


class Problem(BaseModel):
    detail: str = Field(description="what is wrong, in words a person can act on")


def job_view(job: Job, store: JobStore) -> JobView:
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "events": f"{base}/events"}
    if job.state == JobState.SUCCEEDED and job.purged is None:
        links.update(result=f"{base}/result", report=f"{base}/report")
    position, wait = store.place(job.id) if job.state == JobState.QUEUED else (None, None)
    return JobView(id=job.id, state=job.state, stage=job.stage, progress=job.progress, error=job.error,
                   model=job.options.model, worker=job.worker, push=job.push, created=job.created,
                   received_by=job.received_by,
                   input_files=len(job.inputs),
                   started=job.started, finished=job.finished, purged=job.purged,
                   queue_position=position, estimated_wait_s=wait, links=links)


def batch_view(batch: Batch, store: JobStore) -> BatchView:
    jobs = [job_view(j, store) for j in (store.get(i) for i in batch.jobs) if j]
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
    return BatchView(id=batch.id, created=batch.created, counts=counts, done=all(j.state in FINAL for j in jobs),
                     jobs=jobs)
