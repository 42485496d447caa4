"""Job records in Redis, and the one entry point to them that the API and the workers share (`JobStore`): one JSON
record per job (jobstore/records.py), a per-tenant index, the set of queued jobs, idempotency keys and batches, the
history written to the database; with the parts of its own modules: keys and sessions (jobstore/keys.py), delivery,
leases and sweeps (jobstore/lease.py), and what /metrics and the wait estimates read (jobstore/stats.py). Those
modules and this one are the only ones that know Redis's keys.

With a database (jobstore/database.py, `records`), every change of a job's state is also written there, and so is
each audit event; a write the database refuses (it is away for a moment) is kept in Redis and written by the
workers' sweep (`sync_records`), so that the history misses nothing. A job Redis no longer has is read from the
database."""
from __future__ import annotations

import json
import time
import uuid

import redis

from jobstore.base import AWAY, DROP_IF, P, log
from jobstore.errors import STORE_AWAY
from jobstore.keys import Keys
from jobstore.lease import Leases
from jobstore.records import Batch, InputFile, Job, JobOptions, JobState, now
from jobstore.stats import Stats

# a change of any of these fields is a change of the job's history (stage and progress are live state only)
HISTORY = frozenset({"state", "result", "error", "push", "finished", "started", "cancel_requested", "purged"})
IDEMPOTENCY_S = 7 * 86400


class JobStore(Keys, Leases, Stats):
    """The job store of one deployment: Redis at `url`, and its database `records` (jobstore.database.Records) or
    None. `patient` (workers): a restarting Redis is waited for; impatient (the API): given up within seconds and,
    with a database, read from it meanwhile (jobstore/base.py)."""

    def by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        """The job this tenant created with `key`, if any (kept 7 days in Redis, for ever in the database)."""
        job_id = self._try(lambda: self._r.get(f"{P}idem:{tenant}:{key}"))
        if job_id and job_id is not AWAY:
            return self.get(job_id)
        return self.records.by_idempotency_key(tenant, key) if self.records is not None else None

    # The job record, its indexes and its idempotency key in one step: a second request with the same key finds
    # the first one's job, never a key without a job. Returns the id of the job that already holds the key, or ''.
    _CREATE = """
        if KEYS[1] ~= '' then
          local existing = redis.call('get', KEYS[1])
          if existing and redis.call('exists', ARGV[5] .. existing) == 1 and ARGV[6] == '0' then return existing end
          redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[4])
        end
        redis.call('set', KEYS[2], ARGV[2])
        redis.call('zadd', KEYS[3], ARGV[3], ARGV[1])
        redis.call('zadd', KEYS[4], ARGV[3], ARGV[1])
        redis.call('zadd', KEYS[5], ARGV[3], ARGV[1])
        return ''"""

    def create(self, tenant: str, inputs: list[InputFile | dict], options: JobOptions | dict,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
        """A new queued job, or (existing job, False) when this tenant already used `idempotency_key`. With a
        database, the job is recorded there first (an accepted job is one the database knows; it decides the
        idempotency key atomically), then in Redis; Redis failing after that ends the recorded job as not queued."""
        job = Job(id=uuid.uuid4().hex, tenant=tenant, created=now(), inputs=inputs, options=options)
        if self.records is not None and (existing := self.records.create_job(job, idempotency_key)):
            return existing, False
        keys = [f"{P}idem:{tenant}:{idempotency_key}" if idempotency_key else "", f"{P}job:{job.id}",
                f"{P}tenant:{tenant}", f"{P}queued", f"{P}unsent"]  # unsent: until its message is on the queue
        try:
            existing = self._r.eval(self._CREATE, len(keys), *keys, job.id, job.model_dump_json(), job.created,
                                    IDEMPOTENCY_S, f"{P}job:", "1" if self.records is not None else "0")
        except redis.RedisError:
            if self.records is not None:
                self.records.abandon(job.id, "could not be queued: Redis was unreachable", now())
            raise
        if existing:
            return self.get(existing), False
        return job, True

    def abandon(self, job_id: str, reason: str, idempotency_key: str | None = None) -> None:
        """A recorded job that could not be put on the queue ends failed with `reason`, in Redis when it can and in
        the database in any case (its idempotency key freed, so that a retry makes a new job)."""
        try:
            job = self.update(job_id, state=JobState.FAILED, finished=now(), error=reason)
            if idempotency_key:
                self._r.eval(DROP_IF, 1, f"{P}idem:{job.tenant}:{idempotency_key}", job_id)
        except (redis.RedisError, KeyError):
            pass
        if self.records is not None:
            self.records.abandon(job_id, reason, now())

    def mark_sent(self, job_id: str) -> None:
        """The job's message is on the broker's queue: `requeue_orphans` no longer needs to send it."""
        self._r.zrem(f"{P}unsent", job_id)

    def create_batch(self, tenant: str, job_ids: list[str]) -> Batch:
        batch = Batch(id=uuid.uuid4().hex, tenant=tenant, jobs=job_ids, created=now())
        if self.records is not None:
            self.records.save_batch(batch.id, tenant, job_ids, batch.created)
        self._r.set(f"{P}batch:{batch.id}", batch.model_dump_json())
        return batch

    def get_batch(self, batch_id: str) -> Batch | None:
        raw = self._try(lambda: self._r.get(f"{P}batch:{batch_id}"))
        if raw and raw is not AWAY:
            return Batch.model_validate_json(raw)
        return self.records.batch(batch_id) if self.records is not None else None

    def get(self, job_id: str) -> Job | None:
        """The job as Redis holds it, else as the database last recorded it (a Redis that lost its data, or, for
        the API, one that does not answer)."""
        raw = self._try(lambda: self._r.get(f"{P}job:{job_id}"))
        if raw and raw is not AWAY:
            return Job.model_validate_json(raw)
        return self.records.job(job_id) if self.records is not None else None

    def get_owned(self, job_id: str, tenant: str) -> Job | None:
        """The job when it is `tenant`'s, else None. Another tenant's job costs exactly what no job costs (one
        Redis round trip that reads no record, then one database query by id and tenant that finds nothing), so
        that its existence does not show in the response time."""
        pipe = self._r.pipeline(transaction=False)
        pipe.zscore(f"{P}tenant:{tenant}", job_id)
        pipe.get(f"{P}job:{job_id}")
        answer = self._try(pipe.execute)
        mine, raw = (None, None) if answer is AWAY else answer  # Redis away: the database answers
        if mine is not None and raw:
            return Job.model_validate_json(raw)
        return self.records.job(job_id, tenant=tenant) if self.records is not None else None

    # -- the durable side: job history and audit trail in the database ----------------------------------------
    def keep(self, job: Job) -> None:
        """Write the job's row in the database; if that fails, Redis remembers it for `sync_records`."""
        if self.records is None:
            return
        try:
            self.records.save_job(job)
        except STORE_AWAY:  # the database away for a moment must not fail the job
            log.warning("job %s: the database refused its history; kept for the next sweep", job.id, exc_info=True)
            self._r.zadd(f"{P}unsynced", {job.id: time.time()})
            self.count("history_deferred")

    def audit(self, tenant: str, actor: str, action: str, job_id: str | None = None,
              detail: dict | None = None) -> None:
        """One audit event (who did what to which job); kept in Redis for `sync_records` if the database fails."""
        if self.records is None:
            return
        event = {"tenant": tenant, "actor": actor, "action": action, "job_id": job_id, "detail": detail or {},
                 "at": time.time()}
        try:
            self.records.audit(**event)
        except STORE_AWAY:  # the database away for a moment must not lose the event
            log.warning("audit event %s: the database refused it; kept for the next sweep", event, exc_info=True)
            self._r.rpush(f"{P}audit_pending", json.dumps(event))
            self.count("audit_deferred")

    _ZREM_IF = ("if tonumber(redis.call('zscore', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then "
                "return redis.call('zrem', KEYS[1], ARGV[1]) else return 0 end")

    def sync_records(self) -> int:
        """Write what the database refused before: job histories first (audit events refer to them), then audit
        events in their order; one sweep at a time across all processes. Returns how many were written; stops at
        the first failure of the database (retried next sweep). An event the database refuses for what it holds
        (a constraint, a value too long) goes to `isl:audit_dead` with a log line instead of blocking the rest."""
        from sqlalchemy.exc import DataError, IntegrityError

        if self.records is None or not self._r.set(f"{P}syncing", "1", nx=True, ex=300):
            return 0
        written = 0
        try:
            for job_id, score in self._r.zrange(f"{P}unsynced", 0, -1, withscores=True):
                raw = self._r.get(f"{P}job:{job_id}")
                if raw:
                    self.records.save_job(Job.model_validate_json(raw))  # the newest record wins (its rev)
                    written += 1
                # off the list unless a newer failure put it back meanwhile
                self._r.eval(self._ZREM_IF, 1, f"{P}unsynced", job_id, repr(score))
            while raw := self._r.lindex(f"{P}audit_pending", 0):
                try:
                    self.records.audit(**json.loads(raw))
                    written += 1
                except (IntegrityError, DataError):
                    log.error("audit event %s refused by the database for what it holds; kept in %saudit_dead",
                              raw, P, exc_info=True)
                    self._r.rpush(f"{P}audit_dead", raw)
                self._r.lpop(f"{P}audit_pending")
        finally:
            self._r.delete(f"{P}syncing")
        return written

    def pending_records(self) -> int:
        """Job histories and audit events waiting for the database."""
        return int(self._r.zcard(f"{P}unsynced")) + int(self._r.llen(f"{P}audit_pending"))

    def update(self, job_id: str, **fields) -> Job:
        """Atomic read-modify-write of one job record (optimistic locking)."""
        key = f"{P}job:{job_id}"
        with self._r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise KeyError(job_id)
                    job = Job.model_validate_json(raw).with_fields(**fields)
                    pipe.multi()
                    pipe.set(key, job.model_dump_json())
                    if job.state != JobState.QUEUED:
                        pipe.zrem(f"{P}queued", job_id)
                    pipe.execute()
                    if HISTORY & fields.keys():
                        self.keep(job)
                    return job
                except redis.WatchError:
                    continue


    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[Job], int]:
        """One page of this tenant's jobs, newest first, and how many it has: from the database when there is one
        (it keeps every job), each job as Redis holds it live."""
        if self.records is not None:
            ids, total = self.records.jobs(tenant, offset, limit)
        else:
            key = f"{P}tenant:{tenant}"
            ids, total = self._r.zrevrange(key, offset, offset + limit - 1), int(self._r.zcard(key))
        return [j for j in (self.get(i) for i in ids) if j], total


def open_store(redis_url: str, database_url: str, patient: bool = True) -> JobStore:
    """The job store of a deployment: its Redis and its database, whose schema is first brought up to date (every
    process may do so at start; they take turns). `patient`: see JobStore."""
    from jobstore.database import Records

    records = Records(database_url)
    records.upgrade()
    return JobStore(redis_url, records, patient)
