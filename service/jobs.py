"""Job records in Redis, and the one module that knows Redis's keys: one JSON record per job (service/records.py),
a per-tenant index, the set of queued jobs (queue positions and wait estimates), idempotency keys, the delivery
count that ends a job which kills its worker every time, the lease that lets exactly one worker run a job at a
time, and what /metrics reads (worker heartbeats, stage durations, fault events).

Exactly-once results rest on the lease, not on the broker: a worker runs a job only while it holds
`isl:lease:{id}` (SET NX with a TTL, renewed by the worker). A second delivery of the same job (the broker's
visibility timeout, a reconnect after a Redis restart) finds the lease held and is acknowledged without
running; a job whose worker died loses its lease within the TTL and `requeue_orphans` sends it again.

With a database (service/db.py, `records`), every change of a job's state is also written there, and so is each
audit event; a write the database refuses (it is away for a moment) is kept in Redis and written by the workers'
sweep (`sync_records`), so that the history misses nothing. A job Redis no longer has is read from the database."""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable

import redis

from service.records import FINAL, Attempt, Batch, InputFile, Job, JobOptions, JobState, now
from service.redisconn import connect

log = logging.getLogger("isl.jobs")
P = "isl:"
# a change of any of these fields is a change of the job's history (stage and progress are live state only)
HISTORY = frozenset({"state", "result", "error", "push", "finished", "started", "cancel_requested", "purged"})
IDEMPOTENCY_S = 7 * 86400
KOMBU_SEP = "\x06\x16"  # kombu's separator of a queue's name and its priority
AWAY, AWAY_S = object(), 5.0  # a Redis that did not answer is not asked again for AWAY_S (see JobStore._try)
Sender = Callable[[str, int], None]


class JobStore:
    def __init__(self, url: str, records=None, patient: bool = True):
        self.records = records  # service.db.Records, or None: Redis only
        # patient (workers): a restarting Redis is waited for (~30 s of retries), not turned into failed jobs;
        # impatient (the API): given up after ~3 s, so that a request is answered (503, or from the database)
        self._r = connect(url, patient=patient)
        self._fallback = records is not None and not patient  # the API reads the database while Redis is away
        self._away_until = 0.0

    def _try(self, read):
        """`read()` against Redis; AWAY instead when Redis fails now or failed within the last AWAY_S seconds and
        the database can answer (the API's reads), so that a page of 50 jobs does not wait 50 times."""
        if self.redis_away():
            return AWAY
        try:
            return read()
        except redis.RedisError:
            if not self._fallback:
                raise
            log.warning("Redis is unreachable; reading the database for %.0f s", AWAY_S)
            self._away_until = time.monotonic() + AWAY_S
            return AWAY

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except redis.RedisError:
            return False

    # -- keys revoked at runtime (sha256 of the key); removing a key from ISL_API_KEYS revokes it at restart --
    # The database holds every revocation; Redis a copy that every API process reads, reloaded from the database
    # whenever its marker is missing (a Redis that lost its data, or a new one).
    def revoked(self, key_hash: str) -> bool:
        def read():  # one round trip on every request; a second only when Redis came back empty
            pipe = self._r.pipeline(transaction=False)
            pipe.exists(f"{P}revoked:loaded")
            pipe.sismember(f"{P}revoked", key_hash)
            loaded, member = pipe.execute()
            if self.records is not None and not loaded:
                self._load_revocations()
                member = self._r.sismember(f"{P}revoked", key_hash)
            return bool(member)

        answer = self._try(read)
        return self.records.is_revoked(key_hash) if answer is AWAY else answer  # Redis away: the database

    def _load_revocations(self) -> None:
        """Every revocation the database holds, into Redis (the workers' sweep runs it too: a revocation that a
        failover lost after the marker reached the replica is back within a sweep)."""
        pipe = self._r.pipeline()
        for digest in self.records.revoked():
            pipe.sadd(f"{P}revoked", digest)
        pipe.set(f"{P}revoked:loaded", "1")
        pipe.execute()

    def sync_revocations(self) -> None:
        if self.records is not None:
            self._load_revocations()

    def revoke(self, key_hash: str) -> None:
        """Refused from now on by every API process: written to the database first (it outlives Redis), then
        to Redis (which every request reads)."""
        if self.records is not None:
            self.records.revoke(key_hash, time.time())
        self._r.sadd(f"{P}revoked", key_hash)

    # -- failed credentials per client address and per tenant (service/auth.py) -------------------------------
    _FAIL = ("local n = redis.call('incr', KEYS[1]) if n == 1 then redis.call('expire', KEYS[1], ARGV[1]) end "
             "return {n, redis.call('ttl', KEYS[1])}")

    def count_auth_failure(self, who: str, window_s: int) -> tuple[int, int]:
        """One more failure of `who` (its window starts at its first): (failures in the window, seconds left)."""
        n, ttl = self._r.eval(self._FAIL, 1, f"{P}authfail:{who}", window_s)
        return int(n), max(1, int(ttl))

    def redis_away(self) -> bool:
        """Redis failed the API within the last AWAY_S seconds (see `_try`): callers with a fallback skip it."""
        return self._fallback and time.monotonic() < self._away_until

    # -- console sign-in sessions: only a digest of the session id is stored, as for keys ---------------------
    def open_session(self, tenant: str, key_hash: str, ttl_s: int) -> tuple[str, str]:
        """A new console session of `tenant` signed in with the key of `key_hash`: (session id, CSRF token)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        record = {"tenant": tenant, "key_hash": key_hash, "csrf": csrf, "created": time.time()}
        self._r.set(f"{P}session:{_digest(sid)}", json.dumps(record), ex=ttl_s)
        return sid, csrf

    def session(self, sid: str) -> dict | None:
        """The session record (tenant, key_hash, csrf, created) of a live session id, else None."""
        raw = self._r.get(f"{P}session:{_digest(sid)}") if sid else None
        return json.loads(raw) if raw else None

    def close_session(self, sid: str) -> None:
        self._r.delete(f"{P}session:{_digest(sid)}")

    # -- records ----------------------------------------------------------------------------------------
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
                self._r.eval(self._DROP, 1, f"{P}idem:{job.tenant}:{idempotency_key}", job_id)
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
        row = self.records.batch(batch_id) if self.records is not None else None
        return None if row is None else Batch.model_validate(row)

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
        except Exception:  # noqa: BLE001 - the database away for a moment must not fail the job
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
        except Exception:  # noqa: BLE001
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

    def place(self, job_id: str) -> tuple[int | None, float | None]:
        """(queue position, estimated wait) of a queued job; (None, None) when Redis cannot say (it is away, or
        lost the job: the workers' sweep sends it again)."""
        answer = self._try(lambda: (self.position(job_id), self.estimate_wait(job_id)))
        return (None, None) if answer is AWAY else answer

    def position(self, job_id: str) -> int | None:
        """0-based place among queued jobs (oldest first), None when not queued."""
        rank = self._r.zrank(f"{P}queued", job_id)
        return None if rank is None else int(rank)

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[Job], int]:
        """One page of this tenant's jobs, newest first, and how many it has: from the database when there is one
        (it keeps every job), each job as Redis holds it live."""
        if self.records is not None:
            ids, total = self.records.jobs(tenant, offset, limit)
        else:
            key = f"{P}tenant:{tenant}"
            ids, total = self._r.zrevrange(key, offset, offset + limit - 1), int(self._r.zcard(key))
        return [j for j in (self.get(i) for i in ids) if j], total

    # -- what /metrics and the wait estimates read --------------------------------------------------------
    def counts(self) -> dict[JobState, int]:
        out = dict.fromkeys(JobState, 0)
        for key in self._r.scan_iter(f"{P}job:*", count=500):
            raw = self._r.get(key)
            if raw:
                out[Job.model_validate_json(raw).state] += 1
        return out

    def queue_depth(self) -> int:
        """Jobs waiting for a worker."""
        return int(self._r.zcard(f"{P}queued"))

    def running_count(self) -> int:
        """Jobs a worker runs now."""
        return int(self._r.zcard(f"{P}running"))

    def count(self, event: str) -> None:
        """Counts a fault-handling event for /metrics (isl_job_events_total)."""
        self._r.hincrby(f"{P}events", event, 1)

    def events(self) -> dict[str, int]:
        """Fault-handling events so far, by name."""
        return {name: int(n) for name, n in self._r.hgetall(f"{P}events").items()}

    def duplicates(self, job_id: str) -> int:
        """Deliveries of this job refused because another worker held its lease."""
        return int(self._r.get(f"{P}duplicates:{job_id}") or 0)

    def beat(self, worker: str, ttl_s: int, info: dict | None = None) -> None:
        """A worker process is alive; its heartbeat lapses after `ttl_s` without another. `info` (its device,
        queues...) lapses with it."""
        self._r.set(f"{P}worker:{worker}", time.time(), ex=ttl_s)
        if info is not None:
            self._r.set(f"{P}workerinfo:{worker}", json.dumps(info), ex=ttl_s)

    def worker_info(self, worker: str) -> dict:
        """What a live worker said of itself in its heartbeat ({} when nothing)."""
        raw = self._r.get(f"{P}workerinfo:{worker}")
        return json.loads(raw) if raw else {}

    def running_jobs(self) -> list[str]:
        """The ids of the jobs workers run now, the longest running first."""
        return list(self._r.zrange(f"{P}running", 0, -1))

    def ended_since(self, since: float) -> list[Job]:
        """Jobs Redis holds that ended (succeeded, failed or cancelled) at or after `since`, newest first: what the
        operations page counts (a scan of the live job records, which the retention policy keeps bounded)."""
        out = []
        for key in self._r.scan_iter(f"{P}job:*", count=500):
            raw = self._r.get(key)
            if raw:
                job = Job.model_validate_json(raw)
                if job.finished is not None and job.finished >= since:
                    out.append(job)
        return sorted(out, key=lambda j: j.finished, reverse=True)

    def workers(self) -> dict[str, float]:
        """Live worker processes: name -> time of the last heartbeat (Unix seconds)."""
        out = {}
        for key in self._r.scan_iter(f"{P}worker:*", count=500):
            t = self._r.get(key)
            if t:
                out[key[len(f"{P}worker:"):]] = float(t)
        return out

    def record_stage_seconds(self, seconds: dict[str, float]) -> None:
        """Adds one job's seconds per engine stage to the totals."""
        pipe = self._r.pipeline()
        for stage, s in seconds.items():
            pipe.hincrbyfloat(f"{P}stage_seconds", f"{stage}:sum", s)
            pipe.hincrby(f"{P}stage_seconds", f"{stage}:count", 1)
        pipe.execute()

    def stage_seconds(self) -> dict[str, dict[str, float]]:
        """stage -> {'sum': seconds over all jobs, 'count': jobs that ran it}."""
        out: dict[str, dict[str, float]] = {}
        for key, value in self._r.hgetall(f"{P}stage_seconds").items():
            name, _, kind = key.rpartition(":")
            out.setdefault(name, {})[kind] = float(value)
        return out

    def estimate_wait(self, job_id: str) -> float | None:
        """Seconds until a worker should take this queued job: the workers' free times (idle now, or the mean
        job duration minus what each running job has done) assigned greedily to the jobs ahead of it.
        None while there is no live worker or no finished job to take a duration from."""
        position = self.position(job_id)
        durations = [float(d) for d in self._r.lrange(f"{P}durations", 0, -1)]
        workers = sum(1 for _ in self._r.scan_iter(f"{P}worker:*", count=500))
        if position is None or not durations or workers == 0:
            return None
        mean, t = sum(durations) / len(durations), time.time()
        running = [max(0.0, mean - (t - started))
                   for _, started in self._r.zrange(f"{P}running", 0, -1, withscores=True)]
        free = sorted(running)[:workers] + [0.0] * max(0, workers - len(running))
        heapq.heapify(free)
        for _ in range(position):
            heapq.heapreplace(free, free[0] + mean)
        return round(free[0], 1)

    # -- worker side -----------------------------------------------------------------------------------
    def deliver(self, job_id: str, max_deliveries: int, holder: str, lease_s: int,
                holder_alive: Callable[[str], bool] = lambda h: True, worker: str = "") -> tuple[Job | None, str]:
        """Called when a worker receives a job. Takes the job's lease for `holder` and says what to do:
        'run'; 'skip' (final or cancelled already); 'duplicate' (another live worker holds the lease: this
        delivery is a copy and must not run); 'poison' (delivered too often without finishing: now failed)."""
        if not self._take_lease(job_id, holder, lease_s, holder_alive):
            return self.get(job_id), "duplicate"
        job = self.get(job_id)
        if job is None or job.state in FINAL:
            self.release(job_id, holder)
            return job, "skip"
        if job.cancel_requested:
            job = self.update(job_id, state=JobState.CANCELLED, finished=now())
            self.release(job_id, holder)
            return job, "skip"
        n = int(self._r.incr(f"{P}deliveries:{job_id}"))
        if n > max_deliveries:
            reason = (f"the job stopped its worker {n - 1} times (delivered {n - 1} times without finishing); "
                      "it is not retried again: check the input, or the worker's logs and memory")
            job = self.update(job_id, state=JobState.FAILED, error=reason, finished=now(), deliveries=n - 1)
            self.release(job_id, holder)
            self.count("poisoned")
            return job, "poison"
        started = now()
        attempts = job.attempts
        if attempts and attempts[-1].outcome is None:  # its run ended without a word: that worker stopped
            attempts[-1] = attempts[-1].model_copy(update={"ended": started, "outcome": "its worker stopped"})
            self.count("worker_stopped")
        attempts.append(Attempt(worker=worker, holder=holder, started=started))
        job = self.update(job_id, state=JobState.RUNNING, started=started, deliveries=n, stage="starting",
                          worker=worker, holder=holder, attempts=attempts)
        self._r.zadd(f"{P}running", {job_id: started})
        return job, "run"

    def _take_lease(self, job_id: str, holder: str, lease_s: int, holder_alive: Callable[[str], bool]) -> bool:
        """The job's lease for `holder`; False when another live holder has it (this delivery is a copy)."""
        lease = f"{P}lease:{job_id}"
        if self._r.set(lease, holder, nx=True, ex=lease_s):
            return True
        current = self._r.get(lease)
        if current and holder_alive(current):
            self._r.incr(f"{P}duplicates:{job_id}")
            self.count("duplicate_delivery_refused")
            return False
        # its holder is gone (a worker process on this host that died): take the lease over
        return self._swap(lease, current, holder, lease_s)

    _SWAP = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
             "return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) and 1 else return 0 end")
    _RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
              "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end")
    _DROP = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def _swap(self, lease: str, old: str | None, new: str, lease_s: int) -> bool:
        if old is None:
            return bool(self._r.set(lease, new, nx=True, ex=lease_s))
        return bool(self._r.eval(self._SWAP, 1, lease, old, new, lease_s))

    def renew(self, job_id: str, holder: str, lease_s: int) -> bool:
        """Extends the lease while `holder` still holds it; False when it was lost (stop: someone else runs it)."""
        return bool(self._r.eval(self._RENEW, 1, f"{P}lease:{job_id}", holder, lease_s))

    def lease_holder(self, job_id: str) -> str | None:
        return self._r.get(f"{P}lease:{job_id}")

    def holds(self, job_id: str, holder: str) -> bool:
        return self.lease_holder(job_id) == holder

    def release(self, job_id: str, holder: str) -> None:
        self._r.eval(self._DROP, 1, f"{P}lease:{job_id}", holder)

    def finish(self, job_id: str, holder: str, **fields) -> Job:
        """The end of a run: the final fields, off the running set, lease released (in that order, so that
        `requeue_orphans` never sees a running job without a lease that is not an orphan)."""
        job = self.get(job_id)
        attempts = job.attempts if job else []
        if attempts:
            attempts[-1] = attempts[-1].model_copy(update={"ended": now(), "outcome": str(fields.get("state", ""))})
        job = self.update(job_id, **fields, attempts=attempts)
        self._r.zrem(f"{P}running", job_id)
        if job.state == JobState.SUCCEEDED and job.started:
            pipe = self._r.pipeline()
            pipe.lpush(f"{P}durations", round(job.finished - job.started, 3))
            pipe.ltrim(f"{P}durations", 0, 49)
            pipe.execute()
        self.release(job_id, holder)
        return job

    def turn(self, name: str, every_s: float) -> bool:
        """True for one caller per `every_s` seconds across all processes sharing this Redis (periodic sweeps)."""
        return bool(self._r.set(f"{P}turn:{name}", "1", nx=True, px=max(1, int(every_s * 1000))))

    def next_sweep_in(self) -> float:
        """Seconds until `requeue_orphans` may sweep again (one sweep at a time across all workers)."""
        return max(0.0, self._r.pttl(f"{P}reaper") / 1000)

    def requeue_orphans(self, send: Sender, unsent_after_s: float = 60) -> list[str]:
        """Jobs marked running whose lease has expired (their worker died) go back to the queue and are sent
        again; the delivery count still bounds how often. Jobs recorded but never sent (the API stopped
        between the two) are sent after `unsent_after_s`. One sweep at a time across all workers."""
        if not self._r.set(f"{P}reaper", "1", nx=True, ex=2):
            return []
        sent = []
        for job_id in self._r.zrangebyscore(f"{P}unsent", "-inf", time.time() - unsent_after_s):
            job = self.get(job_id)
            if job is not None and job.state == JobState.QUEUED:
                send(job_id, job.options.priority)  # a second copy would be refused by the lease
                sent.append(job_id)
                self.count("sent_by_sweep")
            self.mark_sent(job_id)
        for job_id in self._r.zrange(f"{P}running", 0, -1):
            requeued = self._requeue_if_orphan(job_id)
            if requeued is None:
                continue
            job, stopped = requeued
            send(job_id, job.options.priority)
            sent.append(job_id)
            self.count("requeued")
            if stopped:
                self.count("worker_stopped")
        return sent

    def resend_lost_messages(self, queue: str, send: Sender, older_than_s: float = 60) -> list[str]:
        """Queued jobs, queued more than `older_than_s` ago, of which the broker holds no message, neither waiting in
        the queue (any priority) nor delivered and unacknowledged: a Redis failover or restart lost it between the
        broker's two steps (a message taken off the queue, then recorded as delivered). Sent again; should the
        message be in flight at this very instant, the copy is refused by the lease. Returns the ids sent."""
        waiting = self._r.zrangebyscore(f"{P}queued", "-inf", time.time() - older_than_s)
        if not waiting:
            return []
        pipe = self._r.pipeline(transaction=False)
        for name in [queue] + [f"{queue}{KOMBU_SEP}{p}" for p in (3, 6, 9)]:  # kombu's priority queues
            pipe.lrange(name, 0, -1)
        pipe.hvals("unacked")  # kombu's delivered, unacknowledged messages
        held = "\n".join(m for found in pipe.execute() for m in found)  # each names its job id (Celery's argsrepr)
        sent = []
        for job_id in waiting:
            if job_id in held or (job := self.get(job_id)) is None or job.state != JobState.QUEUED:
                continue
            send(job_id, job.options.priority)
            sent.append(job_id)
            self.count("resent_lost_message")
        return sent

    _RESTORE = ("if redis.call('set', KEYS[1], ARGV[1], 'NX') then redis.call('zadd', KEYS[2], ARGV[2], ARGV[3]); "
                "redis.call('zadd', KEYS[3], ARGV[2], ARGV[3]); return 1 else return 0 end")

    def restore_lost(self, send: Sender, has_input: Callable[[str], bool], older_than_s: float = 60) -> list[str]:
        """Jobs the database knows as accepted and not ended, accepted more than `older_than_s` ago, that Redis no
        longer holds (it came back empty, or a failover lost its last writes): put back as queued and sent again,
        each once (the record is restored with SET NX: one sweeper wins); one whose input is gone ends failed,
        saying so. Returns the ids sent."""
        if self.records is None:
            return []
        lost = [j for j in self.records.unfinished() if j.created < time.time() - older_than_s]
        pipe = self._r.pipeline(transaction=False)
        for job in lost:
            pipe.exists(f"{P}job:{job.id}")
        sent = []
        for job, held in zip(lost, pipe.execute() if lost else []):
            if held:
                continue
            if not has_input(job.id):
                self.records.abandon(job.id, "the queue lost this job and its input is no longer on disk; submit "
                                             "it again", now())
                self.count("lost_without_input")
                continue
            job = job.with_fields(state=JobState.QUEUED, stage="requeued: the queue lost it", progress=0.0,
                                  worker="", holder="")
            keys = [f"{P}job:{job.id}", f"{P}tenant:{job.tenant}", f"{P}queued"]
            if self._r.eval(self._RESTORE, len(keys), *keys, job.model_dump_json(), job.created, job.id):
                self.keep(job)
                send(job.id, job.options.priority)
                sent.append(job.id)
                self.count("restored_after_redis_loss")
        return sent

    def _requeue_if_orphan(self, job_id: str) -> tuple[Job, bool] | None:
        """A running job without a lease goes back to queued: (job, whether its last run ended without a
        word); None when it is not an orphan (or no longer running: then it leaves the running set)."""
        key, lease = f"{P}job:{job_id}", f"{P}lease:{job_id}"
        with self._r.pipeline() as pipe:
            try:
                pipe.watch(key, lease)
                raw = pipe.get(key)
                if pipe.exists(lease):
                    return None
                job = Job.model_validate_json(raw) if raw else None
                pipe.multi()
                if job is None or job.state != JobState.RUNNING:
                    pipe.zrem(f"{P}running", job_id)
                    pipe.execute()
                    return None
                attempts = job.attempts
                stopped = bool(attempts) and attempts[-1].outcome is None
                if stopped:
                    attempts[-1] = attempts[-1].model_copy(update={"ended": now(), "outcome": "its worker stopped"})
                job = job.with_fields(state=JobState.QUEUED, stage="requeued: its worker stopped", progress=0.0,
                                      worker="", holder="", attempts=attempts)
                pipe.set(key, job.model_dump_json())
                pipe.zrem(f"{P}running", job_id)
                pipe.zadd(f"{P}queued", {job_id: job.created})
                pipe.execute()
                self.keep(job)
                return job, stopped
            except redis.WatchError:
                return None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def open_store(settings, patient: bool = True) -> JobStore:
    """The job store of a deployment (`Settings`): its Redis and its database, whose schema is first brought up
    to date (every process may do so at start; they take turns). `patient`: see JobStore."""
    from service.db import Records

    records = Records(settings.database())
    records.upgrade()
    return JobStore(settings.redis_url, records, patient)
