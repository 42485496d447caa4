"""What /metrics, the operations page and the wait estimates read: jobs by state, the queue's depth and a job's
place in it, fault-handling events, worker heartbeats and what each worker says of itself, seconds per engine stage,
and the estimated wait of a queued job."""
from __future__ import annotations

import heapq
import json
import time

from jobstore.base import AWAY, P, StoreBase
from jobstore.records import Job, JobState


class Stats(StoreBase):
    """A part of `JobStore` (jobstore/store.py)."""

    def place(self, job_id: str) -> tuple[int | None, float | None]:
        """(queue position, estimated wait) of a queued job; (None, None) when Redis cannot say (it is away, or
        lost the job: the workers' sweep sends it again)."""
        answer = self._try(lambda: (self.position(job_id), self.estimate_wait(job_id)))
        return (None, None) if answer is AWAY else answer

    def position(self, job_id: str) -> int | None:
        """0-based place among queued jobs (oldest first), None when not queued."""
        rank = self._r.zrank(f"{P}queued", job_id)
        return None if rank is None else int(rank)

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
