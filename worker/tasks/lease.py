"""A job runs only under its lease (jobstore/lease.py): who holds it (host:pid), whether a holder on this host
still lives, the thread that renews a run's lease, and each worker process's heartbeat, which also requeues
the jobs of dead workers."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery.signals import worker_process_init

from jobstore.errors import STORE_AWAY
from jobstore.store import JobStore
from service.queue import BROKER_AWAY, Queue
from service.retention import purge_expired
from service.storage import Storage
from worker.tasks.app import job_store, settings

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    pass


def holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_alive(holder: str) -> bool:
    """A lease holder on another host is taken to be alive (its lease expires if not); on this host, its
    process is checked: a worker process killed here is taken over at once instead of after the lease."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _device_name() -> str:
    """The device this worker runs on, as an operator reads it: cpu, or cuda:0 and the GPU's name."""
    import torch

    from isl.refiner import pick_device

    device = pick_device(settings.device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def heartbeat(store: JobStore, name: str) -> None:
    """Every few seconds: this process is alive (metrics, wait estimates), jobs of dead workers go back to the
    queue, and what the database refused before is written; every ISL_RETENTION_SWEEP_S, one worker deletes the
    files of jobs past the retention age."""
    queue, storage = Queue(settings), Storage(settings.storage_root)
    info = {"device": _device_name(), "node": socket.gethostname(), "holder": holder()}  # holder: its jobs' leases
    while True:
        try:
            store.beat(name, max(30, 3 * settings.lease_s), info)
            for job_id in store.requeue_orphans(queue.send, unsent_after_s=max(10, 2 * settings.lease_s)):
                log.warning("job %s: requeued (its worker stopped, or it was never sent)", job_id)
            if store.turn("restore", max(10, 2 * settings.lease_s)):
                for job_id in store.restore_lost(queue.send, lambda i: _has_input(storage, i),
                                                 older_than_s=max(10, 2 * settings.lease_s)):
                    log.warning("job %s: sent again (Redis had lost it; the database knew it)", job_id)
            if store.turn("revocations", 10):
                store.sync_revocations()
            if store.turn("messages", 60):
                for job_id in store.resend_lost_messages(settings.queue, queue.send, older_than_s=60):
                    log.warning("job %s: sent again (queued, but the broker held no message of it)", job_id)
        except (*STORE_AWAY, *BROKER_AWAY):  # Redis or the broker away for a moment: the next beat retries
            log.warning("heartbeat to Redis failed", exc_info=True)
        try:
            # one sweep at a time across workers: sync_records holds a lock while it runs (0 when another has it)
            if store.pending_records() and (written := store.sync_records()):
                log.info("wrote %d deferred records to the database", written)
            if settings.retention_days and store.turn("retention", settings.retention_sweep_s):
                purge_expired(store, storage, settings.retention_days)
        except STORE_AWAY:  # the database away for a moment: the records wait in Redis, the files stay
            log.warning("database sweep failed; retried at the next beat", exc_info=True)
        time.sleep(min(10, max(1, settings.lease_s / 3)))


def _has_input(storage: Storage, job_id: str) -> bool:
    return all(p.exists() for p in storage.input_paths(job_id))


@worker_process_init.connect
def _start_heartbeat(**_):
    name = f"{socket.gethostname()}-{os.getpid()}"
    threading.Thread(target=heartbeat, args=(job_store(), name), daemon=True).start()


class Lease(threading.Thread):
    """Renews this run's lease every third of its TTL; `lost` is set if another holder took it."""

    def __init__(self, store: JobStore, job_id: str, holder: str):
        super().__init__(daemon=True)
        self.store, self.job_id, self.holder = store, job_id, holder
        self.lost, self.done = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(settings.lease_s / 3):
            try:
                if not self.store.renew(self.job_id, self.holder, settings.lease_s):
                    self.lost.set()
                    return
            except STORE_AWAY:  # Redis away: the lease may lapse; the next renewal tells
                log.warning("job %s: renewing the lease failed", self.job_id, exc_info=True)

    def check(self) -> None:
        """LeaseLost once another holder runs the job (this run must stop, and record nothing)."""
        if self.lost.is_set() or not self.store.holds(self.job_id, self.holder):
            raise LeaseLost()
