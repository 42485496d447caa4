"""Who is calling: a tenant's API key (X-API-Key or Authorization: Bearer), checked against ISL_API_KEYS and the
revocations; and the throttle on failures, which every credential check goes through.

A wrong or revoked key, or a failed console sign-in, counts against the client's address (a revoked key: against
its tenant as well, from whatever address): past ISL_AUTH_FAILURES per ISL_AUTH_WINDOW_S, each further one is answered
429 with Retry-After until the window ends, so that guessing stops. A valid key always gets in (clients behind one
proxy share an address; a leaked, revoked key must not lock its tenant out). The first failure of a window and the
one that reaches the limit are audit events. The counters live in Redis, shared by every API process; while Redis
is away, each process counts on its own."""
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
    """Failures per client address and per tenant in a fixed window that starts at the first failure (Redis, one
    script per count; a dict of this process while Redis is away)."""

    def __init__(self, store, limit: int, window_s: int):
        self.store, self.limit, self.window_s = store, limit, window_s
        self._local: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def failed(self, *who: str) -> tuple[int, int]:
        """Count one failure against each `who`: (the highest count now, seconds left of that one's window)."""
        counts = [self._count(w) for w in who if w]
        return max(counts, default=(0, 0))

    def _count(self, who: str) -> tuple[int, int]:
        try:
            if not self.store.redis_away():
                return self.store.count_auth_failure(who, self.window_s)
        except redis.RedisError:
            pass
        with self._lock:
            n, until = self._local.get(who, (0, 0.0))
            if until <= time.time():
                n, until = 0, time.time() + self.window_s
            self._local[who] = (n + 1, until)
            return n + 1, int(until - time.time()) + 1


class Keys:
    """The configured keys (sha256 -> tenant), the revocations (the job store: Redis, and the database behind
    it) and the throttle: `check` lets a caller in or says why not."""

    def __init__(self, by_digest: dict[str, str], store, settings):
        self.by_digest, self.store = by_digest, store
        self.throttle = Throttle(store, settings.auth_failures, settings.auth_window_s)

    def check(self, key: str | None, addr: str, via: str = "api") -> Caller:
        """The caller of `key` from address `addr`; Refused (401: none, wrong or revoked; 429: one too many wrong
        or revoked keys from this address, or revoked keys of this tenant from any). A valid key always gets in: a
        client behind the same proxy, or a leaked and revoked key of the same tenant, cannot lock a tenant out."""
        digest = hash_key(key) if key else ""
        tenant = self.by_digest.get(digest)
        if tenant is not None and not self.store.revoked(digest):
            return Caller(tenant, digest)
        if key is not None:
            n, wait = self.failure(addr, tenant, "revoked key" if tenant else "unknown key", via, digest)
            if n > self.throttle.limit:
                raise Refused(429, f"too many failed sign-ins or bad keys from this address; try again in {wait} s",
                              {"Retry-After": str(wait)})
        raise Refused(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="isl"'})

    def failure(self, addr: str, tenant: str | None, reason: str, via: str, digest: str = "") -> tuple[int, int]:
        """One failed credential: counted (per address; a revoked key also per tenant, from any address); the
        window's first and the one that reaches the limit are audited. (count, seconds left of its window)."""
        n, wait = self.throttle.failed(f"addr:{addr}", f"tenant:{tenant}" if tenant else "")
        if n == 1 or n == self.throttle.limit:
            action = "auth_locked" if n == self.throttle.limit else "auth_failed"
            detail = {"address": addr, "via": via, "reason": reason, "failures": n,
                      "window_s": self.throttle.window_s}
            self.store.audit(tenant or UNKNOWN, key_actor(digest) if tenant else f"address:{addr}", action,
                             detail=detail)
            log.warning("%s: %s", action, detail)
        return n, wait
