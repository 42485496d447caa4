"""Helpers of the tests that talk to the service stack (the `stack` fixture in conftest.py), and a private
redis-server for the tests that need Redis but no process of the service."""
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from jobstore.records import FINAL
from worker.localstack import free_port, wait_for_redis, wait_until

# radiology: the tenant whose corrections join its atlas bank (tests/service/test_corrections.py), kept apart so that
# alpha's refinements stay those of the bundle's own atlases
KEYS = {"alpha": "alpha-secret-key-1", "beta": "beta-secret-key-2", "gamma": "gamma-key-to-be-revoked",
        "radiology": "radiology-key-3"}


@contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A redis-server of its own on a free port (no persistence), its URL (tests using it are marked `redis`)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    try:
        wait_for_redis(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(20)


class PostgresServer:
    """A PostgreSQL server of its own (Debian's postgresql binaries, a fresh cluster, trust authentication) on a
    free port, with a database `isl` (`url`, for SQLAlchemy); `stop()` and `start()` take it away and bring it
    back on the same port and data. As root it runs as the `postgres` user (initdb refuses root)."""

    def __init__(self):
        initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))  # tests using it are marked `postgres`
        self.bindir, self.port = initdb[-1].parent, free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.folder = Path(tempfile.mkdtemp(prefix="isl-pg-"))
        self.folder.chmod(0o755)
        if self.as_user:
            shutil.chown(self.folder, "postgres")
        subprocess.run([*self.as_user, str(initdb[-1]), "-D", str(self.folder / "data"), "-U", "isl", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True)
        self.url = f"postgresql+psycopg://isl@127.0.0.1:{self.port}/isl"
        self.proc = None

    def start(self) -> None:
        import psycopg

        self.proc = subprocess.Popen([*self.as_user, str(self.bindir / "postgres"), "-D", str(self.folder / "data"),
                                      "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.folder),
                                      "-c", "fsync=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def accepts():
            try:
                with psycopg.connect(f"host=127.0.0.1 port={self.port} user=isl dbname=postgres",
                                     autocommit=True) as c:
                    if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'isl'").fetchone():
                        c.execute("CREATE DATABASE isl")
                return True
            except psycopg.OperationalError:
                return False

        wait_until(accepts, 60, f"PostgreSQL on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            # a fast shutdown (SIGTERM's smart one waits for clients; runuser passes on no SIGINT)
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "stop", "-D", str(self.folder / "data"),
                            "-m", "fast", "-w"], capture_output=True, timeout=60)
            self.proc.wait(30)
            self.proc = None


@contextmanager
def private_postgres() -> Iterator[PostgresServer]:
    """A started PostgresServer, removed afterwards."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


def client(tenant="alpha") -> httpx.Client:
    return httpx.Client(headers={"X-API-Key": KEYS[tenant]}, timeout=60)


def submit(base, path, tenant="alpha", **headers):
    with client(tenant) as c, open(path, "rb") as fh:
        return c.post(base + "/v1/jobs", files={"files": (path.name, fh)}, headers=headers)


def wait_final(base, job_id, tenant="alpha", timeout=240):
    with client(tenant) as c:
        return wait_until(lambda: (j := c.get(f"{base}/v1/jobs/{job_id}").json())["state"] in FINAL and j,
                          timeout, f"job {job_id}")


def scan(phantom_dataset, i=0) -> Path:
    return sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))[i]


@contextmanager
def orthanc(folder: Path, http_port: int, dicom_port: int, **config) -> Iterator[str]:
    """A real Orthanc (Debian's `orthanc`) on these ports with its database under `folder` and `config` on top;
    its REST URL (tests using it are marked `dicom_peer`). Its log's tail is printed when it stops."""
    exe = shutil.which("Orthanc")
    config = {"Name": "isl-test-pacs", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False} | config
    (folder / "orthanc.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{http_port}"
    with open(folder / "orthanc.log", "w") as log:
        proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(url + "/system"), 60, "Orthanc")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        print((folder / "orthanc.log").read_text()[-3000:])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
