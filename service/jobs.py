"""Job records in Redis: one JSON record per job, a per-tenant index, the set of queued jobs (queue positions
and wait estimates), idempotency keys, the delivery count that ends a job which kills its worker every time,
and the lease that lets exactly one worker run a job at a time.

Exactly-once results rest on the lease, not on the broker: a worker runs a job only while it holds
`isl:lease:{id}` (SET NX with a TTL, renewed by the worker). A second delivery of the same job (the broker's
visibility timeout, a reconnect after a Redis restart) finds the lease held and is acknowledged without
running; a job whose worker died loses its lease within the TTL and `requeue_orphans` sends it again."""
from __future__ import annotations

import heapq
import json
import time
import uuid
from collections.abc import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = {"succeeded", "failed", "cancelled"}
P = "isl:"


def now() -> float:
    return round(time.time(), 3)


class JobStore:
    def __init__(self, url: str):
        # A restarting Redis (seconds) is waited for, not turned into failed jobs or 5xx: ~30 s of retries.
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                      retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 20),
                                      retry_on_error=[redis.ConnectionError, redis.TimeoutError])

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    # -- keys revoked at runtime (sha256 of the key); removing a key from ISL_API_KEYS revokes it at restart --
    def revoked(self, key_hash: str) -> bool:
        return bool(self.r.sismember(f"{P}revoked", key_hash))

    def revoke(self, key_hash: str) -> None:
        self.r.sadd(f"{P}revoked", key_hash)

    # -- records ----------------------------------------------------------------------------------------
    def by_idempotency_key(self, tenant: str, key: str) -> dict | None:
        """The job this tenant created with `key`, if any (keys live 7 days)."""
        job_id = self.r.get(f"{P}idem:{tenant}:{key}")
        return self.get(job_id) if job_id else None

    def create(self, tenant: str, inputs: list[dict], options: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """A new queued job, or (existing job, False) when this tenant already used `idempotency_key`."""
        job_id = uuid.uuid4().hex
        if idempotency_key:
            idem = f"{P}idem:{tenant}:{idempotency_key}"
            if not self.r.set(idem, job_id, nx=True, ex=7 * 86400):
                existing = self.get(self.r.get(idem) or "")
                if existing:
                    return existing, False
                self.r.set(idem, job_id, ex=7 * 86400)
        job = {"id": job_id, "tenant": tenant, "state": "queued", "stage": "", "progress": 0.0, "error": "",
               "created": now(), "started": None, "finished": None, "inputs": inputs, "options": options,
               "result": None, "deliveries": 0, "cancel_requested": False, "worker": "", "attempts": []}
        pipe = self.r.pipeline()
        pipe.set(f"{P}job:{job_id}", json.dumps(job))
        pipe.zadd(f"{P}tenant:{tenant}", {job_id: job["created"]})
        pipe.zadd(f"{P}queued", {job_id: job["created"]})
        pipe.zadd(f"{P}unsent", {job_id: job["created"]})  # until its message is on the queue (mark_sent)
        pipe.execute()
        return job, True

    def count(self, event: str) -> None:
        """Counts a fault-handling event for /metrics (isl_job_events_total)."""
        self.r.hincrby(f"{P}events", event, 1)

    def mark_sent(self, job_id: str) -> None:
        """The job's message is on the broker's queue: `requeue_orphans` no longer needs to send it."""
        self.r.zrem(f"{P}unsent", job_id)

    def create_batch(self, tenant: str, job_ids: list[str]) -> dict:
        batch = {"id": uuid.uuid4().hex, "tenant": tenant, "jobs": job_ids, "created": now()}
        self.r.set(f"{P}batch:{batch['id']}", json.dumps(batch))
        return batch

    def get_batch(self, batch_id: str) -> dict | None:
        raw = self.r.get(f"{P}batch:{batch_id}")
        return json.loads(raw) if raw else None

    def get(self, job_id: str) -> dict | None:
        raw = self.r.get(f"{P}job:{job_id}")
        return json.loads(raw) if raw else None

    def update(self, job_id: str, **fields) -> dict:
        """Atomic read-modify-write of one job record (optimistic locking)."""
        key = f"{P}job:{job_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise KeyError(job_id)
                    job = json.loads(raw)
                    job.update(fields)
                    pipe.multi()
                    pipe.set(key, json.dumps(job))
                    if job["state"] != "queued":
                        pipe.zrem(f"{P}queued", job_id)
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue

    def position(self, job_id: str) -> int | None:
        """0-based place among queued jobs (oldest first), None when not queued."""
        rank = self.r.zrank(f"{P}queued", job_id)
        return None if rank is None else int(rank)

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[dict], int]:
        key = f"{P}tenant:{tenant}"
        ids = self.r.zrevrange(key, offset, offset + limit - 1)
        jobs = [j for j in (self.get(i) for i in ids) if j]
        return jobs, int(self.r.zcard(key))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for key in self.r.scan_iter(f"{P}job:*", count=500):
            raw = self.r.get(key)
            if raw:
                out[json.loads(raw)["state"]] += 1
        return out

    def estimate_wait(self, job_id: str) -> float | None:
        """Seconds until a worker should take this queued job: the workers' free times (idle now, or the mean
        job duration minus what each running job has done) assigned greedily to the jobs ahead of it.
        None while there is no live worker or no finished job to take a duration from."""
        position = self.position(job_id)
        durations = [float(d) for d in self.r.lrange(f"{P}durations", 0, -1)]
        workers = sum(1 for _ in self.r.scan_iter(f"{P}worker:*", count=500))
        if position is None or not durations or workers == 0:
            return None
        mean, t = sum(durations) / len(durations), time.time()
        running = [max(0.0, mean - (t - started)) for _, started in self.r.zrange(f"{P}running", 0, -1, withscores=True)]
        free = sorted(running)[:workers] + [0.0] * max(0, workers - len(running))
        heapq.heapify(free)
        for _ in range(position):
            heapq.heapreplace(free, free[0] + mean)
        return round(free[0], 1)

    # -- worker side -----------------------------------------------------------------------------------
    def deliver(self, job_id: str, max_deliveries: int, holder: str, lease_s: int,
                holder_alive: Callable[[str], bool] = lambda h: True, worker: str = "") -> tuple[dict | None, str]:
        """Called when a worker receives a job. Takes the job's lease for `holder` and says what to do:
        'run'; 'skip' (final or cancelled already); 'duplicate' (another live worker holds the lease: this
        delivery is a copy and must not run); 'poison' (delivered too often without finishing: now failed)."""
        lease = f"{P}lease:{job_id}"
        if not self.r.set(lease, holder, nx=True, ex=lease_s):
            current = self.r.get(lease)
            if current and holder_alive(current):
                self.r.incr(f"{P}duplicates:{job_id}")
                self.count("duplicate_delivery_refused")
                return self.get(job_id), "duplicate"
            # its holder is gone (a worker process on this host that died): take the lease over
            if not self._swap(lease, current, holder, lease_s):
                return self.get(job_id), "duplicate"
        job = self.get(job_id)
        if job is None or job["state"] in FINAL:
            self.release(job_id, holder)
            return job, "skip"
        if job["cancel_requested"]:
            job = self.update(job_id, state="cancelled", finished=now())
            self.release(job_id, holder)
            return job, "skip"
        n = int(self.r.incr(f"{P}deliveries:{job_id}"))
        if n > max_deliveries:
            reason = (f"the job stopped its worker {n - 1} times (delivered {n - 1} times without finishing); "
                      "it is not retried again: check the input, or the worker's logs and memory")
            job = self.update(job_id, state="failed", error=reason, finished=now(), deliveries=n - 1)
            self.release(job_id, holder)
            self.count("poisoned")
            return job, "poison"
        started = now()
        attempts = job.get("attempts", [])
        if attempts and "outcome" not in attempts[-1]:  # its run ended without a word: that worker stopped
            attempts[-1].update(ended=started, outcome="its worker stopped")
            self.count("worker_stopped")
        attempts.append({"worker": worker, "holder": holder, "started": started})
        job = self.update(job_id, state="running", started=started, deliveries=n, stage="starting", worker=worker,
                          holder=holder, attempts=attempts)
        self.r.zadd(f"{P}running", {job_id: started})
        return job, "run"

    _SWAP = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) and 1 else return 0 end"
    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
    _DROP = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def _swap(self, lease: str, old: str | None, new: str, lease_s: int) -> bool:
        if old is None:
            return bool(self.r.set(lease, new, nx=True, ex=lease_s))
        return bool(self.r.eval(self._SWAP, 1, lease, old, new, lease_s))

    def renew(self, job_id: str, holder: str, lease_s: int) -> bool:
        """Extends the lease while `holder` still holds it; False when it was lost (stop: someone else runs it)."""
        return bool(self.r.eval(self._RENEW, 1, f"{P}lease:{job_id}", holder, lease_s))

    def holds(self, job_id: str, holder: str) -> bool:
        return self.r.get(f"{P}lease:{job_id}") == holder

    def release(self, job_id: str, holder: str) -> None:
        self.r.eval(self._DROP, 1, f"{P}lease:{job_id}", holder)

    def finish(self, job_id: str, holder: str, **fields) -> dict:
        """The end of a run: the final fields, off the running set, lease released (in that order, so that
        `requeue_orphans` never sees a running job without a lease that is not an orphan)."""
        job = self.get(job_id) or {}
        attempts = job.get("attempts", [])
        if attempts:
            attempts[-1].update(ended=now(), outcome=fields.get("state", ""))
        job = self.update(job_id, **fields, attempts=attempts)
        self.r.zrem(f"{P}running", job_id)
        if job["state"] == "succeeded" and job.get("started"):
            pipe = self.r.pipeline()
            pipe.lpush(f"{P}durations", round(job["finished"] - job["started"], 3))
            pipe.ltrim(f"{P}durations", 0, 49)
            pipe.execute()
        self.release(job_id, holder)
        return job

    def requeue_orphans(self, send: Callable[[str, int], None], unsent_after_s: float = 60) -> list[str]:
        """Jobs marked running whose lease has expired (their worker died) go back to the queue and are sent
        again; the delivery count still bounds how often. Jobs recorded but never sent (the API stopped
        between the two) are sent after `unsent_after_s`. One sweep at a time across all workers."""
        if not self.r.set(f"{P}reaper", "1", nx=True, ex=2):
            return []
        sent = []
        for job_id in self.r.zrangebyscore(f"{P}unsent", "-inf", time.time() - unsent_after_s):
            job = self.get(job_id)
            if job is not None and job["state"] == "queued":
                send(job_id, int(job["options"].get("priority", 5)))  # a second copy would be refused by the lease
                sent.append(job_id)
                self.count("sent_by_sweep")
            self.mark_sent(job_id)
        for job_id in self.r.zrange(f"{P}running", 0, -1):
            key, lease = f"{P}job:{job_id}", f"{P}lease:{job_id}"
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key, lease)
                    raw = pipe.get(key)
                    if pipe.exists(lease):
                        continue
                    job = json.loads(raw) if raw else None
                    pipe.multi()
                    if job is None or job["state"] != "running":
                        pipe.zrem(f"{P}running", job_id)
                        pipe.execute()
                        continue
                    job.update(state="queued", stage="requeued: its worker stopped", progress=0.0, worker="", holder="")
                    stopped = bool(job.get("attempts")) and "outcome" not in job["attempts"][-1]
                    if stopped:
                        job["attempts"][-1].update(ended=now(), outcome="its worker stopped")
                    pipe.set(key, json.dumps(job))
                    pipe.zrem(f"{P}running", job_id)
                    pipe.zadd(f"{P}queued", {job_id: job["created"]})
                    pipe.execute()
                except redis.WatchError:
                    continue
            send(job_id, int(job["options"].get("priority", 5)))
            sent.append(job_id)
            self.count("requeued")
            if stopped:
                self.count("worker_stopped")
        return sent
