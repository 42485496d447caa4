"""Connections to Redis from one setting, ISL_REDIS_URL, which names either one server or a Redis Sentinel group:

- `redis://[:PASSWORD@]HOST:PORT/DB`: a single server (redis-py's URL form).
- `sentinel://[[USER]:PASSWORD@]HOST1:PORT1,HOST2:PORT2,HOST3:PORT3/MASTER_NAME[/DB]`: the sentinels (port 26379
  when left out) that watch the primary called MASTER_NAME (`sentinel monitor MASTER_NAME ...`), and the database
  number (0 when left out). Every client asks the sentinels where the primary is, and asks again when it stops
  answering, so a failover (the sentinels promote a replica) is a pause, not an outage. The credentials, if any,
  are the primary's and also the sentinels' (give both the same `requirepass`). Special characters in them are
  percent-encoded, as in any URL.

Two kinds of caller: the API answers a request within seconds, so its client gives up after about 3 s of a Redis
that does not answer (the route then answers 503 with Retry-After, or serves what the database knows); a worker
waits through a Redis restart or a failover (about 30 s of retries) rather than fail a job. A failover takes the
sentinels' `down-after-milliseconds` plus an election (a second or two; a split vote is retried after twice
`failover-timeout`): keep that within the 30 s (docker-compose.yml's `ha` profile: 5 s, and 2 x 10 s at worst).
The broker (Celery, kombu) reads the same setting through `broker`."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

RETRIED = [redis.ConnectionError, redis.TimeoutError]  # MasterNotFoundError (no primary yet) is a ConnectionError
SENTINEL_PORT = 26379
FORMS = "redis://HOST:PORT/DB or sentinel://HOST1:PORT1,HOST2:PORT2,HOST3:PORT3/MASTER_NAME[/DB]"


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `sentinel://` ISL_REDIS_URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def auth(self) -> dict[str, str]:
        """The credentials as redis-py keywords (none when the URL has none)."""
        return {k: v for k, v in (("username", self.username), ("password", self.password)) if v}


def _bad(problem: str) -> ValueError:
    return ValueError(f"ISL_REDIS_URL: {problem} (expected {FORMS})")


def _port(text: str, host: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _bad(f"the port of sentinel {host!r} is {text!r}, not a number from 1 to 65535")
    return int(text)


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a `sentinel://` URL; ValueError naming ISL_REDIS_URL and what is wrong (never the password)."""
    rest = url.removeprefix("sentinel://")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise _bad("credentials must be written ':PASSWORD@' or 'USER:PASSWORD@'")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = []
    for item in hosts.split(","):
        item = item.strip()
        host, colon, port = item.rpartition(":") if ":" in item.rpartition("]")[2] else (item, "", "")
        host = host.removeprefix("[").removesuffix("]")  # an IPv6 address is bracketed: [::1]:26379
        if not host:
            raise _bad(f"sentinel {item!r} has no host" if item else "a sentinel address is empty")
        sentinels.append((host, _port(port, host) if colon else SENTINEL_PORT))
    parts = path.split("/") if path else []
    if not parts or not parts[0]:
        raise _bad("the master name is missing (the name the sentinels monitor, as in '/isl')")
    if len(parts) > 2:
        raise _bad(f"after the master name only a database number may follow, not {'/'.join(parts[1:])!r}")
    db = parts[1] if len(parts) == 2 and parts[1] else "0"
    if not db.isdigit():
        raise _bad(f"the database {db!r} is not a number")
    return SentinelURL(tuple(sentinels), unquote(parts[0]), int(db), username, password)


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix", "sentinel"):
        raise _bad(f"scheme {scheme + '://' if scheme else '(none)'} is not one of redis://, rediss://, unix://, "
                   "sentinel://")
    return scheme


def check_url(url: str) -> None:
    """ValueError naming ISL_REDIS_URL and the problem when `url` is no Redis or Sentinel URL."""
    if _scheme(url) == "sentinel":
        parse_sentinel(url)


def connect(url: str, *, patient: bool = True) -> redis.Redis:
    """A client of the Redis named by `url` (strings decoded), of the primary when it names sentinels. `patient`:
    retry about 30 s (workers, sweeps); otherwise fail within about 3 s (the API)."""
    if patient:
        retried = RETRIED
        retry, timeouts = Retry(ExponentialBackoff(cap=2.0, base=0.05), 20), {"socket_connect_timeout": 5}
    else:
        # a refused connection is retried; a timeout is not: each would cost the whole socket timeout again
        retried = [redis.ConnectionError]
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 3, supported_errors=tuple(retried))
        timeouts = {"socket_connect_timeout": 1, "socket_timeout": 2}
    if _scheme(url) != "sentinel":
        return redis.Redis.from_url(url, decode_responses=True, retry=retry, retry_on_error=retried, **timeouts)
    s = parse_sentinel(url)
    # a primary that vanished without closing its connections (a host down, not a process) must time out, or a
    # patient client would wait on it forever instead of asking the sentinels again; no command here blocks
    timeouts.setdefault("socket_timeout", 10)
    # a sentinel that does not answer is skipped at once (the next one is asked), not retried: `retry` above
    # retries the whole discovery
    asking = {"socket_timeout": 1 if patient else 0.25, "socket_connect_timeout": 1 if patient else 0.25,
              "retry": Retry(NoBackoff(), 0)}
    sentinel = Sentinel(list(s.sentinels), sentinel_kwargs=asking | s.auth(), **timeouts)
    return sentinel.master_for(s.master, db=s.db, decode_responses=True, retry=retry, retry_on_error=retried,
                               **s.auth())


def broker(url: str) -> dict:
    """The Celery settings of the broker named by `url`: `broker_url`, and for sentinels kombu's form of it (one
    `sentinel://` URL per sentinel, joined by ';') plus the `broker_transport_options` kombu's SentinelChannel
    reads (master_name; sentinel_kwargs: how kombu's clients of the sentinels connect: the credentials, and a
    sentinel that does not answer skipped, as in `connect`). Merge those options into the other transport
    options."""
    if _scheme(url) != "sentinel":
        return {"broker_url": url}
    s = parse_sentinel(url)
    cred = f"{quote(s.username or '', safe='')}:{quote(s.password, safe='')}@" if s.password else ""
    # the database and the credentials on every URL: kombu moves to the next URL when one fails to connect
    urls = ";".join(f"sentinel://{cred}{f'[{host}]' if ':' in host else host}:{port}/{s.db}"
                    for host, port in s.sentinels)
    return {"broker_url": urls,
            "broker_transport_options": {"master_name": s.master,
                                         "sentinel_kwargs": {"socket_timeout": 1, "socket_connect_timeout": 1,
                                                             "retry": Retry(NoBackoff(), 0), **s.auth()},
                                         # a primary gone without closing its connections is noticed (kombu's
                                         # advice for failover); longer than kombu's 1 s BRPOP wait
                                         "socket_timeout": 10, "socket_connect_timeout": 5}}
