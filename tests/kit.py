"""Helpers of the tests that talk to the service stack (the `stack` fixture in conftest.py)."""
from pathlib import Path

import httpx

from worker.localstack import wait_until

KEYS = {"alpha": "alpha-secret-key-1", "beta": "beta-secret-key-2", "gamma": "gamma-key-to-be-revoked"}
FINAL = ("succeeded", "failed", "cancelled")


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
