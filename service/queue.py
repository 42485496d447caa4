"""The service's side of the Celery queue: it only sends job ids by task name (it never imports the worker)."""
from __future__ import annotations

from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from jobstore.redisconn import broker
from service.settings import Settings

TASK = "isl.refine"
TRAIN_TASK = "isl.retrain"
# what a send raises while the broker is away: kombu's error for a connection it gave up retrying, and what may come
# through unwrapped (Redis's own errors, a read-only replica during a failover; a socket's OSError)
BROKER_AWAY: tuple[type[BaseException], ...] = (OperationalError, RedisError, OSError)


def celery_config(settings: Settings) -> dict:
    """Shared by the sender and the workers: JSON only, late acks, one job at a time per worker (the workers add
    their time limits and memory bound: worker/tasks/app.py). ISL_REDIS_URL may name a Redis or its sentinels
    (jobstore/redisconn.py): the broker's URL and options follow it."""
    conn = broker(settings.redis_url)
    return {
        "broker_url": conn["broker_url"],
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
                                     "queue_order_strategy": "priority",
                                     **conn.get("broker_transport_options", {})},
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
    }


class Queue:
    """Sends job ids. `patient` (workers' sweeps): retries for about 25 s; the API's gives up within about 3 s, so
    that an upload is answered (503) while Redis is away."""

    def __init__(self, settings: Settings, patient: bool = True):
        self.settings = settings
        self.app = Celery("isl-service")
        self.app.conf.update(celery_config(settings))
        self.retry_policy = ({"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}
                             if patient else {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.3,
                                              "interval_max": 1})

    def send(self, job_id: str, priority: int = 5) -> None:
        self.app.send_task(TASK, args=[job_id], queue=self.settings.queue, priority=priority, retry=True,
                           retry_policy=self.retry_policy)

    def send_training(self, training_id: str) -> None:
        """A retraining, on its own queue (ISL_TRAIN_QUEUE)."""
        self.app.send_task(TRAIN_TASK, args=[training_id], queue=self.settings.train_queue, retry=True,
                           retry_policy=self.retry_policy)
