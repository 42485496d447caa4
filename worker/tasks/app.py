"""The workers' Celery application: the shared queue configuration (service/queue.py) plus what only a worker
enforces (a job's time limits, the memory bound of a worker process)."""
from __future__ import annotations

import functools

from celery import Celery

from jobstore.store import JobStore, open_store
from service.queue import celery_config
from worker.tasks.settings import WorkerSettings


def worker_config(settings: WorkerSettings) -> dict:
    return celery_config(settings) | {
        "task_time_limit": settings.job_time_limit_s,
        "task_soft_time_limit": max(1, settings.job_time_limit_s - 60),
        "worker_max_memory_per_child": settings.worker_max_memory_mb * 1024 or None,
    }


settings = WorkerSettings()
app = Celery("isl-worker")
app.conf.update(worker_config(settings))


@functools.cache
def job_store() -> JobStore:
    """This worker process's job store (Redis and the database), opened once, after the fork."""
    return open_store(settings.redis_url, settings.database())
