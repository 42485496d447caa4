"""The storage root filling up, for real: the service's storage is a small tmpfs (mounting needs root; the
test skips and says so otherwise), filled by the test while uploads come in and while a job runs."""
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from worker.localstack import LocalStack, wait_until

KEY = "storage-tenant-key"


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    mount = tmp_path_factory.mktemp("smalldisk")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def stack(small_disk, tiny_bundle, phantom_dataset, tmp_path_factory):
    env = {"ISL_STORAGE_ROOT": str(small_disk / "isl"), "ISL_MIN_FREE_MB": "2"}
    with LocalStack(tmp_path_factory.mktemp("full"), tiny_bundle.parent, tiny_bundle.name, phantom_dataset,
                    {"ops": KEY}, workers=1, extra_env=env) as s:
        try:
            yield s
        finally:
            print(s.logs())


def fill(disk: Path, leave: int) -> Path:
    """A filler file taking all free space but `leave` bytes (0: write until the device refuses)."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    chunk = b"\xa5" * (1 << 20)
    with open(filler, "wb") as fh:
        try:
            while True:
                free = shutil.disk_usage(disk).free - leave
                if free <= 0:
                    break
                fh.write(chunk[:free])
                fh.flush()
        except OSError:
            pass
    return filler


def leftovers(root: Path) -> list[str]:
    """Anything half-written: staging content, temporary files, partial outputs."""
    found = [str(p) for p in (root / "staging").rglob("*")] if (root / "staging").exists() else []
    found += [str(p) for p in root.rglob("*.part*")] + [str(p) for p in root.rglob(".*.nii*")]
    return found


def post(stack, name, data) -> httpx.Response:
    with httpx.Client(headers={"X-API-Key": KEY}, timeout=120) as c:
        return c.post(stack.url + "/v1/jobs", files={"files": (name, data)})


def big_scan() -> bytes:
    """A readable scan of 6 MB (uncompressed NIfTI)."""
    import nibabel as nib

    arr = np.random.default_rng(0).normal(100, 10, (116, 116, 116)).astype(np.float32)
    return nib.Nifti1Image(arr, np.eye(4)).to_bytes()


def test_a_full_storage_refuses_uploads_with_507_and_keeps_nothing(stack, small_disk, phantom_dataset):
    root = Path(stack.env["ISL_STORAGE_ROOT"])
    scan = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))[0].read_bytes()
    # below the configured headroom: refused before a byte is stored
    filler = fill(small_disk, leave=1 << 20)
    r = post(stack, "scan.nii.gz", scan)
    assert r.status_code == 507 and "MB free" in r.json()["detail"], r.text
    # below the upload headroom the service is still ready: Redis answers and the storage takes a small write
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "redis": True, "database": True,
                                                         "storage": True, "down": []}, ready.text
    filler.unlink()
    # above the headroom, but the upload itself does not fit: the device refuses mid-write
    filler = fill(small_disk, leave=3 << 20)
    r = post(stack, "big.nii", big_scan())
    assert r.status_code == 507 and "storage is full" in r.json()["detail"], r.text
    assert leftovers(root) == []
    filler.unlink()
    # with room again, the same upload goes through
    r = post(stack, "scan.nii.gz", scan)
    assert r.status_code == 202, r.text


def test_a_job_running_when_the_storage_fills_fails_cleanly(stack, small_disk, phantom_dataset):
    store = stack.store()
    wait_until(lambda: not store.queue_depth() and not store.running_count(), 240, "an idle worker")
    root = Path(stack.env["ISL_STORAGE_ROOT"])
    scan = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))[1].read_bytes()
    job_id = post(stack, "scan.nii.gz", scan).json()["id"]
    wait_until(lambda: store.get(job_id).stage in ("registration", "finetune", "fusion"), 120, "the job to compute")
    filler = fill(small_disk, leave=0)
    assert httpx.get(stack.url + "/readyz").json()["storage"] is False  # the probe sees it too
    job = wait_until(lambda: (j := store.get(job_id)).state in ("succeeded", "failed") and j, 240, "the job to end")
    assert job.state == "failed" and "storage is full" in job.error, job
    assert sorted(p.name for p in (root / "jobs" / job_id).iterdir()) == ["input"]  # no output, no partial output
    assert leftovers(root) == []
    filler.unlink()
    assert httpx.get(stack.url + "/readyz").json()["ready"] is True
    job_id = post(stack, "scan.nii.gz", scan).json()["id"]
    assert wait_until(lambda: (j := store.get(job_id)).state in ("succeeded", "failed") and j, 240,
                      "the next job").state == "succeeded"
    assert os.listdir(root / "jobs" / job_id / "output")
