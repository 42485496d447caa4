"""No single Redis: ISL_REDIS_URL names Redis Sentinel (jobstore/redisconn.py), and the service rides through a
failover. The URL's parsing is checked on its own; the failover against real processes on this machine: a primary
(append-only file, fsync per write), its replica and three sentinels, the API and two `isl worker` processes; the
primary is killed mid-queue and every job must still succeed exactly once."""
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_faults import KEY, one_result, scan, submit, succeeded_once, wait_state

from jobstore.records import FINAL, JobState
from jobstore.redisconn import SentinelURL, broker, connect, parse_sentinel
from service.queue import celery_config
from service.settings import Settings
from worker.localstack import LocalStack, free_port, wait_for_redis, wait_until

MASTER = "isl"


# -- the URL --------------------------------------------------------------------------------------------------
def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database():
    assert parse_sentinel("sentinel://:s%2Fcret@h1:26379,h2:26380,[::1]/isl/3") == SentinelURL(
        (("h1", 26379), ("h2", 26380), ("::1", 26379)), "isl", 3, None, "s/cret")
    assert parse_sentinel("sentinel://ops:pw@h1:1/isl") == SentinelURL((("h1", 1),), "isl", 0, "ops", "pw")
    assert parse_sentinel("sentinel://h1/isl/").db == 0


@pytest.mark.parametrize("url, problem", [
    ("sentinel://h1:26379", "the master name is missing"),
    ("sentinel://h1:26379/", "the master name is missing"),
    ("sentinel://h1:26379,/isl", "a sentinel address is empty"),
    ("sentinel://:26379/isl", "sentinel ':26379' has no host"),
    ("sentinel://h1:port/isl", "the port of sentinel 'h1' is 'port'"),
    ("sentinel://h1:70000/isl", "not a number from 1 to 65535"),
    ("sentinel://h1/isl/zero", "the database 'zero' is not a number"),
    ("sentinel://h1/isl/0/x", "only a database number may follow, not '0/x'"),
    ("sentinel://secret@h1/isl", "credentials must be written"),
    ("http://h1:6379/0", "scheme http:// is not one of"),
    ("h1:6379", "scheme (none) is not one of"),
])
def test_a_malformed_url_is_refused_naming_the_setting_and_the_problem(url, problem):
    with pytest.raises(ValueError) as err:
        connect(url) if url.startswith(("http", "h1")) else parse_sentinel(url)
    assert str(err.value).startswith("ISL_REDIS_URL: ") and problem in str(err.value), err.value
    assert "secret" not in str(err.value)


def test_the_broker_settings_follow_the_url():
    assert broker("redis://r:6379/0") == {"broker_url": "redis://r:6379/0"}
    conn = broker("sentinel://:p%40ss@s1:26379,s2:26380/isl/2")
    assert conn["broker_url"] == "sentinel://:p%40ss@s1:26379/2;sentinel://:p%40ss@s2:26380/2"
    options = conn["broker_transport_options"]
    assert options["master_name"] == "isl" and options["sentinel_kwargs"]["password"] == "p@ss"
    config = celery_config(Settings(redis_url="sentinel://s1,s2,s3/isl/0", visibility_timeout_s=120))
    assert config["broker_url"].count(";") == 2
    assert config["broker_transport_options"]["master_name"] == "isl"
    assert config["broker_transport_options"]["visibility_timeout"] == 120  # the other options are kept
    assert "sentinel_kwargs" in config["broker_transport_options"]


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a host gone from the network: the kernel still completes
    the handshake), which only a timeout ends."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield silent.getsockname()[1]


@pytest.mark.parametrize("kind", ["sentinels", "redis"])
def test_an_impatient_client_of_a_redis_or_sentinels_that_do_not_answer_gives_up(kind, silent_port):
    """The API's side. Sentinels: one port is closed, the other silent, so no primary is known; a single Redis:
    silent."""
    if kind == "sentinels":
        url, error = f"sentinel://127.0.0.1:{free_port()},127.0.0.1:{silent_port}/isl/0", redis.ConnectionError
    else:
        url, error = f"redis://127.0.0.1:{silent_port}/0", redis.TimeoutError
    client = connect(url, patient=False)
    t0 = time.monotonic()
    with pytest.raises(error):
        client.ping()
    assert time.monotonic() - t0 < 8  # the API's 2 s socket timeout with slack; a patient client waits 10 s or for ever


@pytest.mark.compose
def test_the_compose_profile_ha_offers_the_sentinels_its_url_names(tmp_path):
    """docker-compose.yml's `ha` profile is valid, and the URL its top comment gives names its sentinels."""
    exe, compose = shutil.which("docker-compose"), Path(__file__).resolve().parents[2] / "docker-compose.yml"
    env = {"PATH": "/usr/bin:/bin", "ISL_API_KEYS": "radiology:" + "0" * 64, "ATLAS_DIR": str(tmp_path)}
    out = subprocess.run([exe, "-f", str(compose), "--profile", "ha", "config"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    url = next(w.partition("=")[2] for w in compose.read_text().split() if w.startswith("ISL_REDIS_URL=sentinel://"))
    config, parsed = out.stdout, parse_sentinel(url)
    for service in ["redis-primary", "redis-replica", *(host for host, _ in parsed.sentinels)]:
        assert f"\n  {service}:\n" in config, service
    assert "--replicaof" in config and "--appendonly" in config
    assert f"sentinel monitor {parsed.master} redis-primary 6379 2" in compose.read_text()


# -- a failover ------------------------------------------------------------------------------------------------
class SentinelGroup:
    """A primary, its replica and three sentinels (quorum 2), each a redis-server on a free port of 127.0.0.1,
    started as a test needs them: the primary is down for the sentinels after 1 s."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, {}
        self.primary, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.url = f"sentinel://{','.join(f'127.0.0.1:{p}' for p in self.sentinels)}/{MASTER}/0"

    def _run(self, name: str, args: list[str]) -> None:
        (self.folder / name).mkdir(parents=True, exist_ok=True)
        log = open(self.folder / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen(["redis-server", *args], stdout=log, stderr=subprocess.STDOUT)

    def _server(self, name: str, port: int, *extra: str) -> None:
        self._run(name, ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.folder / name), "--save", "",
                         "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction",
                         *extra])
        wait_for_redis(port)

    def start(self) -> None:
        self._server("primary", self.primary)
        self._server("replica", self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        for i, port in enumerate(self.sentinels):
            conf = self.folder / f"sentinel-{i}.conf"  # sentinel rewrites its own file: one each, writable
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\nsentinel parallel-syncs {MASTER} 1\n")
            self._run(f"sentinel-{i}", [str(conf), "--sentinel"])
        wait_until(self.ready, 60, "the replica in sync and three sentinels that know each other and the replica")

    def ready(self) -> bool:
        try:
            if redis.Redis(port=self.replica).info("replication")["master_link_status"] != "up":
                return False
            views = [redis.Redis(port=p).sentinel_master(MASTER) for p in self.sentinels]
        except redis.RedisError:
            return False
        return all(v["num-other-sentinels"] == 2 and v["num-slaves"] == 1 for v in views)

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers reports it (one that does not is asked once, not
        retried: redis-py's default retries would spend 10 timeouts on it)."""
        for port in self.sentinels:
            client = redis.Redis(port=port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
            try:
                return int(client.sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        return None

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def freeze(self, name: str) -> None:
        """SIGSTOP: the process keeps its port (the kernel still accepts connections) and answers nothing, as a
        host that vanished from the network."""
        self.procs[name].send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.send_signal(signal.SIGCONT)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.folder.glob("*.log")))


@pytest.fixture
def group(tmp_path):
    g = SentinelGroup(tmp_path / "redis")
    try:
        g.start()
        yield g
    finally:
        g.stop()
        print(g.logs())


def progress(store, ids) -> dict:
    """What the workers have written of each job: state, stage, progress and runs."""
    return {i: (j.state, j.stage, j.progress, len(j.attempts)) for i in ids if (j := store.get(i))}


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("frozen, lease_s", [(None, 3), ("sentinel-0", 3), (None, 30)],
                         ids=["primary-killed", "and-first-sentinel-frozen", "default-lease"])
def test_killing_the_primary_mid_queue_loses_and_duplicates_no_job(group, frozen, lease_s, tiny_bundle,
                                                                    phantom_dataset, tmp_path_factory):
    """With `frozen`, the sentinel every client asks first also stops answering (its host gone with the primary's):
    the clients must time out on it and ask the next. A 3 s lease lapses during the failover, so the jobs running
    at the kill are taken over and run again (once each, one result); the default 30 s lease outlasts it, so no
    job runs twice."""
    env = {"ISL_LEASE_S": str(lease_s), "ISL_MAX_DELIVERIES": "3"}
    # a short folder: the API's forkserver socket lives under its storage root (AF_UNIX paths end at 108 bytes)
    with LocalStack(tmp_path_factory.mktemp("ha"), tiny_bundle.parent, tiny_bundle.name, phantom_dataset, {"ops": KEY},
                    workers=2, extra_env=env, redis_url=group.url) as stack:
        try:
            store = stack.store()
            ids = [submit(stack, scan(phantom_dataset, k % 2)) for k in range(20)]
            wait_until(lambda: any((j := store.get(i)).state in FINAL or j.state == JobState.RUNNING and j.stage
                                   not in ("starting", "loading model") for i in ids), 120, "a job to compute")
            before = progress(store, ids)
            t0 = time.monotonic()
            group.kill("primary")  # no shutdown: the replica and the sentinels carry on
            if frozen:
                group.freeze(frozen)
            wait_until(lambda: group.master_port() == group.replica, 60, "the sentinels to promote the replica")
            failover_s = time.monotonic() - t0
            wait_until(lambda: progress(store, ids) != before, 120, "a worker to write to the new primary")
            resume_s = time.monotonic() - t0
            jobs = [wait_state(store, i, FINAL, timeout=600) for i in ids]
            lost = [j.id for j in jobs if j.state != JobState.SUCCEEDED]
            duplicated = [j.id for j in jobs if [a.outcome for a in j.attempts].count(JobState.SUCCEEDED) > 1]
            print(json.dumps({"frozen": frozen, "lease_s": lease_s, "jobs": len(jobs), "lost": len(lost),
                              "duplicated": len(duplicated), "failover_s": round(failover_s, 2),
                              "resume_s": round(resume_s, 2), "attempts": [len(j.attempts) for j in jobs]}))
            assert lost == [] and duplicated == [], [(j.id, j.state, j.error, j.attempts) for j in jobs]
            for j in jobs:
                succeeded_once(j)
                one_result(stack, j.id)
            if lease_s >= 30:  # it outlasts the failover and the reconnection: no job was taken over
                assert all(len(j.attempts) == 1 for j in jobs), [j.attempts for j in jobs if len(j.attempts) > 1]
        finally:
            print(stack.logs())
