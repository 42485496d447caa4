"""What every part of the job store shares: one Redis client, the database of history (or None: Redis only), the
prefix of every key it writes, and the rule by which the API reads the database while Redis does not answer."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from jobstore.redisconn import connect

if TYPE_CHECKING:
    from jobstore.database import Records

log = logging.getLogger("isl.jobs")
P = "isl:"  # every key the job store writes begins with this
AWAY, AWAY_S = object(), 5.0  # a Redis that did not answer is not asked again for AWAY_S (see StoreBase._try)
Sender = Callable[[str, int], None]  # sends a job id to the workers' queue at a priority (service/queue.py)
# deletes a key only while it holds ARGV[1] (a lease its holder releases, an idempotency key of its own job)
DROP_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class StoreBase:
    def __init__(self, url: str, records: Records | None = None, patient: bool = True):
        self.records = records  # jobstore.database.Records, or None: Redis only
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

    def redis_away(self) -> bool:
        """Redis failed the API within the last AWAY_S seconds (see `_try`): callers with a fallback skip it."""
        return self._fallback and time.monotonic() < self._away_until
