"""Who may call: API keys revoked at runtime, failed credentials counted per client address and per tenant
(service/auth.py), and the web console's sign-in sessions. Only digests are stored (the sha256 of a key, of a
session id), never the secrets themselves."""
from __future__ import annotations

import hashlib
import json
import secrets
import time

from jobstore.base import AWAY, P, StoreBase


class Keys(StoreBase):
    """A part of `JobStore` (jobstore/store.py)."""

    # -- keys revoked at runtime (sha256 of the key); removing a key from ISL_API_KEYS revokes it at restart --
    # The database holds every revocation; Redis a copy that every API process reads, reloaded from the database
    # whenever its marker is missing (a Redis that lost its data, or a new one).
    def revoked(self, key_hash: str) -> bool:
        def read():  # one round trip on every request; a second only when Redis came back empty
            pipe = self._r.pipeline(transaction=False)
            pipe.exists(f"{P}revoked:loaded")
            pipe.sismember(f"{P}revoked", key_hash)
            loaded, member = pipe.execute()
            if self.records is not None and not loaded:
                self._load_revocations()
                member = self._r.sismember(f"{P}revoked", key_hash)
            return bool(member)

        answer = self._try(read)
        return self.records.is_revoked(key_hash) if answer is AWAY else answer  # Redis away: the database

    def _load_revocations(self) -> None:
        """Every revocation the database holds, into Redis (the workers' sweep runs it too: a revocation that a
        failover lost after the marker reached the replica is back within a sweep)."""
        pipe = self._r.pipeline()
        for digest in self.records.revoked():
            pipe.sadd(f"{P}revoked", digest)
        pipe.set(f"{P}revoked:loaded", "1")
        pipe.execute()

    def sync_revocations(self) -> None:
        if self.records is not None:
            self._load_revocations()

    def revoke(self, key_hash: str) -> None:
        """Refused from now on by every API process: written to the database first (it outlives Redis), then
        to Redis (which every request reads)."""
        if self.records is not None:
            self.records.revoke(key_hash, time.time())
        self._r.sadd(f"{P}revoked", key_hash)

    # -- failed credentials per client address and per tenant (service/auth.py) -------------------------------
    _FAIL = ("local n = redis.call('incr', KEYS[1]) if n == 1 then redis.call('expire', KEYS[1], ARGV[1]) end "
             "return {n, redis.call('ttl', KEYS[1])}")

    def count_auth_failure(self, who: str, window_s: int) -> tuple[int, int]:
        """One more failure of `who` (its window starts at its first): (failures in the window, seconds left)."""
        n, ttl = self._r.eval(self._FAIL, 1, f"{P}authfail:{who}", window_s)
        return int(n), max(1, int(ttl))

    # -- console sign-in sessions: only a digest of the session id is stored, as for keys ---------------------
    def open_session(self, tenant: str, key_hash: str, ttl_s: int) -> tuple[str, str]:
        """A new console session of `tenant` signed in with the key of `key_hash`: (session id, CSRF token)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        record = {"tenant": tenant, "key_hash": key_hash, "csrf": csrf, "created": time.time()}
        self._r.set(f"{P}session:{_digest(sid)}", json.dumps(record), ex=ttl_s)
        return sid, csrf

    def session(self, sid: str) -> dict | None:
        """The session record (tenant, key_hash, csrf, created) of a live session id, else None."""
        raw = self._r.get(f"{P}session:{_digest(sid)}") if sid else None
        return json.loads(raw) if raw else None

    def close_session(self, sid: str) -> None:
        self._r.delete(f"{P}session:{_digest(sid)}")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
