"""The whole service on one machine, as subprocesses: a private redis-server on a free port, the API
(`isl serve`), N workers (`isl worker`) and, when asked, the DICOM listener (`isl dicom-listener`). Used by the
end-to-end tests and the service benchmarks; handy for trying the service without Docker."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jobstore.store import JobStore
from service.settings import hash_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def wait_for_redis(port: int, timeout: float = 20) -> None:
    import redis

    client = redis.Redis(port=port)

    def pings():
        try:
            return client.ping()
        except redis.RedisError:
            return False

    wait_until(pings, timeout, f"redis-server on port {port}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class LocalStack:
    """`with LocalStack(folder, models_dir, model, atlas_dir, keys={"t": "key"}, workers=1) as stack:` gives
    stack.url (the API) and stack.env (the ISL_* settings); everything stops on exit. Workers run on the CPU
    (ISL_DEVICE=cpu) unless `device` is given: then each is started as `isl worker --device DEVICE`. With
    `redis_url` (any ISL_REDIS_URL, sentinels included), the stack uses that Redis and starts none."""

    def __init__(self, folder: Path, models_dir: Path, model: str, atlas_dir: Path | None, keys: dict[str, str],
                 workers: int = 1, threads_per_worker: int = 1, extra_env: dict[str, str] | None = None,
                 appendonly: bool = False, queues: str | None = None, device: str | None = None,
                 redis_url: str | None = None):
        if redis_url is None and shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.folder, self.procs, self.named, self.appendonly = Path(folder), [], {}, appendonly
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_worker),
                        ISL_REDIS_URL=redis_url or f"redis://127.0.0.1:{self.redis_port}/0",
                        ISL_STORAGE_ROOT=str(self.folder / "storage"), ISL_MODELS_DIR=str(models_dir),
                        ISL_DEFAULT_MODEL=model, ISL_DEVICE="cpu",
                        ISL_API_KEYS=",".join(f"{t}:{hash_key(k)}" for t, k in keys.items()))
        if atlas_dir is not None:
            self.env["ISL_ATLAS_DIR"] = str(atlas_dir)
        self.env.update(extra_env or {})
        self.n_workers, self.queues, self.device, self.external_redis = workers, queues, device, bool(redis_url)

    def _run(self, name: str, args: list[str]) -> subprocess.Popen:
        """Each process leads its own process group, so that `kill` reaches a worker's pool children too."""
        log = open(self.folder / f"{name}.log", "a")
        proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.named[name] = proc
        return proc

    def start_worker(self, name: str, wait: bool = False) -> subprocess.Popen:
        """Starts `isl worker` as node name@localstack; with wait, returns once its pool process beats."""
        store = self.store()
        before = set(store.workers())
        proc = self._run(name, [sys.executable, "-m", "worker.cli", "worker", "--name", f"{name}@localstack",
                                *(["--queues", self.queues] if self.queues else []),
                                *(["--device", self.device] if self.device else [])])
        if wait:
            wait_until(lambda: set(store.workers()) - before, 60, f"worker {name}'s heartbeat")
        return proc

    def store(self) -> JobStore:
        """The job store of this stack's Redis."""
        return JobStore(self.env["ISL_REDIS_URL"])

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float = 30) -> None:
        """Sends `sig` to the named process's whole group (a worker and its pool children) and waits for it."""
        proc = self.named[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(wait)

    def start_redis(self) -> None:
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self._run("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
                            *persist, "--dir", str(self.folder)])
        wait_for_redis(self.redis_port)

    def start_api(self) -> None:
        self._run("api", [sys.executable, "-m", "worker.cli", "serve", "--port", str(self.api_port)])
        wait_until(lambda: _answers(self.url + "/healthz"), 60, "the API")

    def start_listener(self) -> None:
        """`isl dicom-listener` on 127.0.0.1:ISL_DIMSE_PORT (set in extra_env), once it accepts connections."""
        port = int(self.env["ISL_DIMSE_PORT"])
        self._run("listener", [sys.executable, "-m", "worker.cli", "dicom-listener", "--host", "127.0.0.1"])

        def accepts():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(accepts, 60, f"the DICOM listener on port {port}")

    def __enter__(self) -> LocalStack:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.external_redis:
            self.start_redis()
        self.start_api()
        for i in range(self.n_workers):
            self.start_worker(f"w{i + 1}")
        self.wait_for_workers(self.n_workers)
        return self

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        """Until n workers have sent a heartbeat (they are then consuming)."""
        store = self.store()
        wait_until(lambda: len(store.workers()) >= n, timeout, f"{n} worker heartbeats")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("*.log")))

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
