"""Who is calling: a tenant's API key (X-API-Key or Authorization: Bearer), checked against ISL_API_KEYS and the
revocations; and the throttle on failures, which every credential check goes through.

A wrong or revoked key, or a failed console sign-in, counts against the client's address and, where the key
names a tenant (a revoked key), against that tenant: ISL_AUTH_FAILURES per ISL_AUTH_WINDOW_S, then 429 with
Retry-After until the window ends, a correct key included (so that guessing stops). The first failure of a window
and the lock-out are audit events. The counters live in Redis, shared by every API process; while Redis is away,
each process counts on its own."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from service.settings import hash_key

log = logging.getLogger("isl.auth")
UNAUTHORIZED = "a valid API key is required (X-API-Key header or Authorization: Bearer)"
UNKNOWN = "-"  # the audit trail's tenant of a failure whose key names none


class Refused(Exception):
    """The caller is not let in: `status` (401 or 429), a one-sentence `detail`, response `headers`."""

    def __init__(self, status: int, detail: str, headers: dict[str, str]):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def key_in(headers) -> str | None:
    """The API key a request carries (X-API-Key, else Authorization: Bearer), or None."""
    key = headers.get("x-api-key")
    if key is None:
        auth = headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else None
    return key or None


def key_actor(digest: str) -> str:
    """How the audit trail names a caller: its key id, the first 12 hex digits of the key's sha256 (enough to tell
    a tenant's keys apart; the key itself is never stored)."""
    return f"key:{digest[:12]}"


@dataclass(frozen=True)
class Caller:
    tenant: str
    digest: str  # sha256 of the key

    @property
    def actor(self) -> str:
        return key_actor(self.digest)


class Throttle:
    """Failures per client address and per tenant in a fixed window (Redis INCR + EXPIRE; a dict of this process
    while Redis is away)."""

    def __init__(self, store, limit: int, window_s: int):
        self.store, self.limit, self.window_s = store, limit, window_s
        self._local: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def wait(self, *who: str) -> int:
        """Seconds until a locked-out `who` (address or tenant) may try again; 0 when none is locked out."""
        waits = [self._wait(w) for w in who if w]
        return max(waits, default=0)

    def failed(self, *who: str) -> int:
        """Count one failure against each `who`; the highest count now."""
        return max((self._count(w) for w in who if w), default=0)

    def _wait(self, who: str) -> int:
        try:
            n, ttl = self.store.auth_failures(who)
        except redis.RedisError:
            n, ttl = self._local_get(who)
        return max(1, ttl) if n >= self.limit else 0

    def _count(self, who: str) -> int:
        try:
            return self.store.count_auth_failure(who, self.window_s)
        except redis.RedisError:
            with self._lock:
                n, until = self._local_get_raw(who)
                self._local[who] = (n + 1, until if until > time.time() else time.time() + self.window_s)
                return n + 1

    def _local_get_raw(self, who: str) -> tuple[int, float]:
        n, until = self._local.get(who, (0, 0.0))
        return (n, until) if until > time.time() else (0, 0.0)

    def _local_get(self, who: str) -> tuple[int, int]:
        with self._lock:
            n, until = self._local_get_raw(who)
        return n, int(until - time.time()) + 1


class Keys:
    """The configured keys (sha256 -> tenant), the revocations (the job store: Redis, and the database behind
    it) and the throttle: `check` lets a caller in or says why not."""

    def __init__(self, by_digest: dict[str, str], store, settings):
        self.by_digest, self.store = by_digest, store
        self.throttle = Throttle(store, settings.auth_failures, settings.auth_window_s)

    def check(self, key: str | None, addr: str, via: str = "api") -> Caller:
        """The caller of `key` from address `addr`; Refused (401: none, wrong or revoked; 429: too many failures
        from this address or for this tenant)."""
        digest = hash_key(key) if key else ""
        tenant = self.by_digest.get(digest)
        if wait := self.throttle.wait(f"addr:{addr}", f"tenant:{tenant}" if tenant else ""):
            raise Refused(429, f"too many failed sign-ins or bad keys from this address or for this tenant; try "
                               f"again in {wait} s", {"Retry-After": str(wait)})
        if tenant is not None and not self.store.revoked(digest):
            return Caller(tenant, digest)
        if key is not None:
            self.failure(addr, tenant, "revoked key" if tenant else "unknown key", via, digest)
        raise Refused(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="isl"'})

    def failure(self, addr: str, tenant: str | None, reason: str, via: str, digest: str = "") -> None:
        """One failed credential: counted; the window's first and the one that locks out are audited."""
        n = self.throttle.failed(f"addr:{addr}", f"tenant:{tenant}" if tenant else "")
        if n == 1 or n == self.throttle.limit:
            action = "auth_locked" if n == self.throttle.limit else "auth_failed"
            detail = {"address": addr, "via": via, "reason": reason, "failures": n,
                      "window_s": self.throttle.window_s}
            self.store.audit(tenant or UNKNOWN, key_actor(digest) if tenant else f"address:{addr}", action,
                             detail=detail)
            log.warning("%s: %s", action, detail)
