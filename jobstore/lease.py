"""The workers' side of the job store: delivery, the lease that lets exactly one worker run a job at a time, its
renewal and release, the end of a run, and the sweeps that put lost jobs back on the queue.

Exactly-once results rest on the lease, not on the broker: a worker runs a job only while it holds
`isl:lease:{id}` (SET NX with a TTL, renewed by the worker). A second delivery of the same job (the broker's
visibility timeout, a reconnect after a Redis restart) finds the lease held and is acknowledged without
running; a job whose worker died loses its lease within the TTL and `requeue_orphans` sends it again. A job the
broker lost (`resend_lost_messages`) or Redis lost (`restore_lost`, from the database) is sent again too, and the
delivery count ends a job that kills its worker every time."""
from __future__ import annotations

import time
from collections.abc import Callable

import redis

from jobstore.base import DROP_IF, P, Sender, StoreBase
from jobstore.records import FINAL, Attempt, Job, JobState, now

KOMBU_SEP = "\x06\x16"  # kombu's separator of a queue's name and its priority


class Leases(StoreBase):
    """A part of `JobStore` (jobstore/store.py), whose get, update, keep and count it uses."""

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
        self._r.eval(DROP_IF, 1, f"{P}lease:{job_id}", holder)

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
