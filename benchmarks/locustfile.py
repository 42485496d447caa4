"""Load scenario for operators: simulated PACS uploaders and status pollers against a running ISL service.

    ISL_API_KEY=... ISL_LOAD_SCAN=scan.nii.gz locust -f benchmarks/locustfile.py --host http://isl:8000 \\
        --headless -u 50 -r 10 -t 2m

Environment:
  ISL_API_KEY              a tenant key of the service under test
  ISL_LOAD_SCAN            the NIfTI (or .zip DICOM series) each upload sends; keep it small to load the API,
                           realistic to load the workers
  ISL_LOAD_UPLOADERS       how many of the users upload (default 10); the others poll
  ISL_LOAD_UPLOAD_EVERY_S  seconds between one uploader's uploads (default 20)
  ISL_LOAD_JOBS_LOG        optional: a JSON-lines file receiving, per accepted job, its id, the queue position
                           and the wait estimate the API reported at submission (benchmarks/load_bench.py
                           compares them with the real waits)

Locust prints throughput, latency percentiles and errors per request type (and writes CSV with --csv).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

from locust import HttpUser, between, constant_pacing, events, task

KEY = os.environ.get("ISL_API_KEY", "")
SCAN = Path(os.environ.get("ISL_LOAD_SCAN", ""))
UPLOADERS = int(os.environ.get("ISL_LOAD_UPLOADERS", "10"))
EVERY = float(os.environ.get("ISL_LOAD_UPLOAD_EVERY_S", "20"))
LOG = os.environ.get("ISL_LOAD_JOBS_LOG")
_jobs: list[str] = []
_lock = threading.Lock()


@events.init.add_listener
def _check(environment, **_):
    if not KEY:
        raise SystemExit("set ISL_API_KEY to a tenant key of the service under test")
    if not SCAN.is_file():
        raise SystemExit(f"set ISL_LOAD_SCAN to a scan file to upload (got {str(SCAN)!r})")


class Uploader(HttpUser):
    """A PACS-side uploader: one scan every ISL_LOAD_UPLOAD_EVERY_S seconds."""

    fixed_count = UPLOADERS
    wait_time = constant_pacing(EVERY)

    def on_start(self):
        self.client.headers["X-API-Key"] = KEY
        self.data = SCAN.read_bytes()

    @task
    def upload(self):
        with self.client.post("/v1/jobs", files={"files": (SCAN.name, self.data)}, name="POST /v1/jobs",
                              catch_response=True) as r:
            if r.status_code != 202:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            job = r.json()
        with _lock:
            _jobs.append(job["id"])
            if LOG:
                with open(LOG, "a") as fh:
                    fh.write(json.dumps({"id": job["id"], "submitted": time.time(), "position": job["queue_position"],
                                         "estimated_wait_s": job["estimated_wait_s"]}) + "\n")


class Poller(HttpUser):
    """A client following its jobs: the state of one job about once a second, now and then the job list."""

    wait_time = between(0.5, 1.5)

    def on_start(self):
        self.client.headers["X-API-Key"] = KEY

    @task(10)
    def status(self):
        with _lock:
            job_id = random.choice(_jobs) if _jobs else None
        if job_id is None:
            self.client.get("/v1/jobs?limit=10", name="GET /v1/jobs")
            return
        self.client.get(f"/v1/jobs/{job_id}", name="GET /v1/jobs/{id}")

    @task(1)
    def listing(self):
        self.client.get("/v1/jobs?limit=20", name="GET /v1/jobs")
