"""The service's side of the Celery queue: it only sends job ids by task name (it never imports the worker)."""
from __future__ import annotations

from celery import Celery

from service.settings import Settings

TASK = "isl.refine"
TRAIN_TASK = "isl.retrain"


def celery_config(settings: Settings) -> dict:
    """Shared by the sender and the workers: JSON only, late acks, one job at a time per worker (the workers add
    their time limits and memory bound: worker/tasks/app.py)."""
    return {
        "broker_url": settings.redis_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        # unacknowledged messages older than the visibility timeout are swept back every tenth of it (<= 60 s)
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s,
                                     "unacked_restore_interval": max(1, min(60, settings.visibility_timeout_s // 10)),
                                     "unacked_restore_throttle": 1,
                                     "queue_order_strategy": "priority"},
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
    }


class Queue:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = Celery("isl-service")
        self.app.conf.update(celery_config(settings))

    def send(self, job_id: str, priority: int = 5) -> None:
        self.app.send_task(TASK, args=[job_id], queue=self.settings.queue, priority=priority,
                           retry=True, retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5,
                                                     "interval_max": 3})

    def send_training(self, training_id: str) -> None:
        """A retraining, on its own queue (ISL_TRAIN_QUEUE)."""
        self.app.send_task(TRAIN_TASK, args=[training_id], queue=self.settings.train_queue, retry=True,
                           retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5,
                                         "interval_max": 3})
