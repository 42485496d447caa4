"""Job records in Redis: one hash per job, a per-tenant index, the set of queued jobs (for queue positions),
idempotency keys, and the delivery count that ends a job which kills its worker every time."""
from __future__ import annotations

import json
import time
import uuid

import redis

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = {"succeeded", "failed", "cancelled"}
P = "isl:"


def now() -> float:
    return round(time.time(), 3)


class JobStore:
    def __init__(self, url: str):
        self.r = redis.Redis.from_url(url, decode_responses=True)

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

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
               "result": None, "deliveries": 0, "cancel_requested": False, "worker": ""}
        pipe = self.r.pipeline()
        pipe.set(f"{P}job:{job_id}", json.dumps(job))
        pipe.zadd(f"{P}tenant:{tenant}", {job_id: job["created"]})
        pipe.zadd(f"{P}queued", {job_id: job["created"]})
        pipe.execute()
        return job, True

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

    # -- worker side -----------------------------------------------------------------------------------
    def deliver(self, job_id: str, max_deliveries: int, worker: str = "") -> tuple[dict | None, str]:
        """Called when a worker receives a job: counts the delivery and says what to do:
        'run', 'skip' (final or cancelled already), or 'poison' (delivered too often: now failed)."""
        job = self.get(job_id)
        if job is None:
            return None, "skip"
        if job["state"] in FINAL:
            return job, "skip"
        if job["cancel_requested"]:
            return self.update(job_id, state="cancelled", finished=now()), "skip"
        n = int(self.r.incr(f"{P}deliveries:{job_id}"))
        if n > max_deliveries:
            reason = (f"the job stopped its worker {n - 1} times (delivered {n - 1} times without finishing); "
                      "it is not retried again: check the input, or the worker's logs and memory")
            return self.update(job_id, state="failed", error=reason, finished=now(), deliveries=n - 1), "poison"
        return self.update(job_id, state="running", started=now(), deliveries=n, stage="starting", worker=worker), "run"
