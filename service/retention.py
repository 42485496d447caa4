"""The retention policy for patient data: the input and results of a job that ended more than
`ISL_RETENTION_DAYS` ago are deleted from the storage root; the job's record (marked `purged`) and its audit
trail stay in the database, and so will radiologists' corrections, which are not job files. The workers' sweep
runs it every `ISL_RETENTION_SWEEP_S`, one sweep at a time across all workers."""
from __future__ import annotations

import logging
import time

from jobstore.store import JobStore
from service.storage import Storage

log = logging.getLogger("isl.retention")
ACTOR = "retention"


def purge_expired(store: JobStore, storage: Storage, days: float, at: float | None = None) -> list[str]:
    """Delete the files of every job that ended more than `days` before `at` (default now); returns their ids.
    Nothing is deleted when `days` is 0 or there is no database (it is where the policy reads job ages)."""
    if days <= 0 or store.records is None:
        return []
    at = time.time() if at is None else at
    purged = []
    for job in store.records.expired(at - days * 86400):
        storage.remove_job(job.id)
        try:
            store.update(job.id, purged=round(at, 3))
        except KeyError:  # Redis no longer has it: the database's row is the record
            store.keep(job.with_fields(purged=round(at, 3)))
        store.audit(job.tenant, ACTOR, "purge", job.id, {"retention_days": days, "ended": job.finished})
        purged.append(job.id)
        log.info("job %s: input and results deleted (ended %.1f days ago, retention %s days)", job.id,
                 (at - (job.finished or at)) / 86400, days)
    return purged
