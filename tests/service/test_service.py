"""The service end to end, against real components: a private redis-server on a free port, a real
`isl worker` process (Celery, prefork) and the API served by uvicorn (`isl serve`) on a port, over HTTP."""
import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from kit import KEYS, client, scan, submit, wait_final

from service.settings import hash_key
from worker.localstack import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def service(stack):
    return stack.url, stack.env


def test_credentials_are_required(service):
    base, _ = service
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(base + "/v1/jobs", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
    assert httpx.get(base + "/v1/jobs", headers={"Authorization": f"Bearer {KEYS['beta']}"}).status_code == 200
    assert httpx.get(base + "/readyz").json() == {"ready": True, "redis": True, "database": True, "storage": True,
                                                  "down": []}


def test_upload_is_refined_like_isl_refine(service, tiny_bundle, phantom_dataset, tmp_path):
    import json

    from imaging.io import read_image

    base, _ = service
    r = submit(base, scan(phantom_dataset))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    job = wait_final(base, job_id)
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["started"] >= job["created"]
    with client() as c:
        res = c.get(f"{base}/v1/jobs/{job_id}/result")
        report = c.get(f"{base}/v1/jobs/{job_id}/report").json()
        assert c.get(f"{base}/v1/jobs/{job_id}/result", params={"format": "dicom-seg"}).status_code == 404
    assert res.status_code == 200
    (tmp_path / "served.nii.gz").write_bytes(res.content)
    assert res.headers["digest"] == f"sha-256={report['files']['mask']['sha256']}"
    assert set(report["volumes_ml"]) and report["model_version"]
    # `isl refine` with the worker's settings (one CPU thread: float sums depend on the thread count)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISL_")} | {"OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "-m", "worker.cli", "refine", str(scan(phantom_dataset)), "--model",
                          str(tiny_bundle), "--out", str(tmp_path / "local"), "--atlas-dir", str(phantom_dataset),
                          "--device", "cpu", "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr
    local = json.loads((tmp_path / "local" / "report.json").read_text())
    served, expected = read_image(tmp_path / "served.nii.gz"), read_image(tmp_path / "local" / "mask.nii.gz")
    assert np.array_equal(served.array, expected.array)
    assert local["volumes_ml"] == report["volumes_ml"]


def test_events_stream_progress_until_the_end(service, phantom_dataset):
    import json

    base, _ = service
    job_id = submit(base, scan(phantom_dataset)).json()["id"]
    states, stages = [], []
    with client() as c, c.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=240) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                job = json.loads(line[6:])
                states.append(job["state"])
                stages.append(job["stage"])
    assert states[-1] == "succeeded" and "running" in states, states
    assert {"registration", "finetune", "fusion"} & set(stages), stages


@pytest.mark.dicom_peer("dciodvfy")
def test_dicom_series_comes_back_as_dicom_seg(service, tmp_path):
    import highdicom as hd
    import pydicom

    base, _ = service
    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    files = sorted(series.iterdir())
    with client() as c:
        handles = [open(f, "rb") for f in files]
        r = c.post(base + "/v1/jobs", files=[("files", (f.name, h)) for f, h in zip(files, handles)])
        for h in handles:
            h.close()
        assert r.status_code == 202, r.text
        job = wait_final(base, r.json()["id"])
        assert job["state"] == "succeeded", job
        seg = c.get(f"{base}/v1/jobs/{job['id']}/result", params={"format": "dicom-seg"})
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    (tmp_path / "seg.dcm").write_bytes(seg.content)
    dataset = hd.seg.segread(tmp_path / "seg.dcm")
    source = pydicom.dcmread(files[0])
    assert dataset.StudyInstanceUID == source.StudyInstanceUID and dataset.Modality == "SEG"
    # the SEG and the RTSTRUCT of the same job pass dciodvfy and read back onto exactly the NIfTI mask's voxels
    from dicom_corpus import check_exports

    with client() as c:
        rt = c.get(f"{base}/v1/jobs/{job['id']}/result", params={"format": "rtstruct"})
        nifti = c.get(f"{base}/v1/jobs/{job['id']}/result")
        names = {int(k): v for k, v in c.get(f"{base}/v1/jobs/{job['id']}/report").json()["labels"].items()}
    assert rt.status_code == 200 and rt.headers["content-type"] == "application/dicom"
    (tmp_path / "rt.dcm").write_bytes(rt.content)
    (tmp_path / "mask.nii.gz").write_bytes(nifti.content)
    assert pydicom.dcmread(tmp_path / "rt.dcm").StudyInstanceUID == source.StudyInstanceUID
    check_exports(tmp_path / "seg.dcm", tmp_path / "rt.dcm", tmp_path / "mask.nii.gz", series, names)


def test_batches_queue_all_or_nothing(service, phantom_dataset, tmp_path):
    base, _ = service
    cases = [scan(phantom_dataset, 0), scan(phantom_dataset, 1)]
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a scan" * 50)
    with client() as c:
        before = c.get(base + "/v1/jobs").json()["total"]
        bad = c.post(base + "/v1/batches", files=[("files", (p.name, p.read_bytes())) for p in [*cases, junk]])
        assert bad.status_code == 422 and "junk.nii.gz" in bad.json()["detail"]
        assert c.get(base + "/v1/jobs").json()["total"] == before  # nothing of the refused batch was queued
        r = c.post(base + "/v1/batches", files=[("files", (p.name, p.read_bytes())) for p in cases])
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/batches/{batch_id}" and len(r.json()["jobs"]) == 2
        batch = wait_until(lambda: (b := c.get(f"{base}/v1/batches/{batch_id}").json())["done"] and b, 240, "the batch")
        assert batch["counts"] == {"succeeded": 2}
    with client("beta") as c:
        assert c.get(f"{base}/v1/batches/{batch_id}").status_code == 404


def test_other_tenants_see_nothing(service, phantom_dataset):
    base, _ = service
    job_id = submit(base, scan(phantom_dataset, 1)).json()["id"]
    with client("beta") as c:
        for method, path in (("GET", ""), ("GET", "/result"), ("GET", "/report"), ("GET", "/events"), ("DELETE", "")):
            r = c.request(method, f"{base}/v1/jobs/{job_id}{path}")
            assert r.status_code == 404, (method, path, r.text)
        assert job_id not in [j["id"] for j in c.get(base + "/v1/jobs").json()["jobs"]]
    assert wait_final(base, job_id)["state"] == "succeeded"


def test_idempotent_retry_returns_the_same_job(service, phantom_dataset):
    base, _ = service
    first = submit(base, scan(phantom_dataset), **{"Idempotency-Key": "upload-42"})
    again = submit(base, scan(phantom_dataset), **{"Idempotency-Key": "upload-42"})
    other = submit(base, scan(phantom_dataset), tenant="beta", **{"Idempotency-Key": "upload-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    wait_final(base, first.json()["id"])
    wait_final(base, other.json()["id"], tenant="beta")


def test_cancelled_queued_job_never_runs(service, phantom_dataset):
    base, _ = service
    running = submit(base, scan(phantom_dataset)).json()["id"]
    queued = submit(base, scan(phantom_dataset, 1)).json()
    assert queued["state"] == "queued" and queued["queue_position"] is not None
    with client() as c:
        assert c.delete(f"{base}/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
    assert wait_final(base, running)["state"] == "succeeded"
    time.sleep(1)
    with client() as c:
        job = c.get(f"{base}/v1/jobs/{queued['id']}").json()
    assert job["state"] == "cancelled" and job["started"] is None


def test_cancelling_a_running_job_stops_it(service, phantom_dataset):
    base, _ = service
    job_id = submit(base, scan(phantom_dataset)).json()["id"]
    with client() as c:
        wait_until(lambda: c.get(f"{base}/v1/jobs/{job_id}").json()["state"] != "queued", 60, "the job to start")
        assert c.delete(f"{base}/v1/jobs/{job_id}").status_code == 200
    job = wait_final(base, job_id)
    assert job["state"] == "cancelled" and job["started"] is not None, job
    with client() as c:
        assert c.get(f"{base}/v1/jobs/{job_id}/result").status_code == 409


def test_a_tampered_result_is_not_served(service, phantom_dataset):
    base, env = service
    job_id = submit(base, scan(phantom_dataset)).json()["id"]
    assert wait_final(base, job_id)["state"] == "succeeded"
    with client() as c:
        assert c.get(f"{base}/v1/jobs/{job_id}/result").status_code == 200
        mask = Path(env["ISL_STORAGE_ROOT"]) / "jobs" / job_id / "output" / "mask.nii.gz"
        data = bytearray(mask.read_bytes())
        data[-10] ^= 0xFF
        mask.write_bytes(bytes(data))
        r = c.get(f"{base}/v1/jobs/{job_id}/result")
    assert r.status_code == 500 and "checksum" in r.json()["detail"]


def test_bad_uploads_get_a_reason(service, phantom_dataset, tmp_path):
    base, _ = service
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(scan(phantom_dataset).read_bytes()[:400])
    junk = tmp_path / "scan.nii.gz"
    junk.write_bytes(b"this is not an image at all" * 40)
    not_gz = tmp_path / "empty.nii.gz"
    not_gz.write_bytes(gzip.compress(b"\0" * 100))
    slip = tmp_path / "slip.zip"
    import zipfile

    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("../../evil.dcm", b"\0" * 128 + b"DICM" + b"\0" * 100)
    for path in (truncated, junk, not_gz, slip):
        r = submit(base, path)
        assert r.status_code == 422, (path.name, r.status_code, r.text)
        assert path.name in r.json()["detail"]
    with client() as c:
        assert c.post(base + "/v1/jobs", files={"files": ("a.nii.gz", scan(phantom_dataset).read_bytes())},
                      data={"model": "nope"}).status_code == 422


def test_metrics_and_models(service, phantom_dataset):
    base, _ = service
    assert wait_final(base, submit(base, scan(phantom_dataset)).json()["id"])["state"] == "succeeded"
    with client() as c:
        text = c.get(base + "/metrics").text
        models = c.get(base + "/v1/models").json()
    assert 'isl_jobs{state="succeeded"}' in text and "isl_uploaded_bytes_total" in text
    assert 'isl_queue_depth{queue="isl"}' in text and 'isl_stage_seconds_total{stage="finetune"}' in text
    assert "isl_worker_heartbeat_age_seconds{" in text
    assert models["default"] in models["models"]


def test_isl_submit_uploads_in_parallel_resumes_and_reports_failures(service, phantom_dataset, tmp_path):
    import json

    base, env = service
    good = [scan(phantom_dataset, 0), scan(phantom_dataset, 1)]
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a scan" * 100)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "worker.cli", "submit", "--server", base, "--out", str(out), "--parallel", "2",
           "--no-progress"]
    env = {k: v for k, v in env.items() if not k.startswith("ISL_")} | {"ISL_API_KEY": KEYS["alpha"]}
    first = subprocess.run(cmd + [*map(str, good), str(junk)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=400)
    assert first.returncode == 1, first.stderr
    assert "junk: failed" in first.stderr and "422" in first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["succeeded"] == 2 and summary["failed"] == 1
    for p in good:
        case = out / p.name[: -len(".nii.gz")]
        assert (case / "mask.nii.gz").is_file() and json.loads((case / "report.json").read_text())["volumes_ml"]
    with client() as c:
        before = c.get(base + "/v1/jobs").json()["total"]
    again = subprocess.run(cmd + list(map(str, good)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 2
    with client() as c:
        assert c.get(base + "/v1/jobs").json()["total"] == before  # nothing queued twice


@pytest.mark.dicom_peer("dciodvfy")
def test_isl_submit_downloads_rtstruct_for_dicom_and_says_a_nifti_has_none(service, phantom_dataset, tmp_path):
    import json
    import zipfile

    import pydicom

    base, env = service
    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    with zipfile.ZipFile(tmp_path / "ct5n.zip", "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f.name)
    nifti = scan(phantom_dataset, 0)
    out = tmp_path / "results"
    env = {k: v for k, v in env.items() if not k.startswith("ISL_")} | {"ISL_API_KEY": KEYS["alpha"]}
    run = subprocess.run([sys.executable, "-m", "worker.cli", "submit", str(tmp_path / "ct5n.zip"), str(nifti),
                          "--server", base, "--out", str(out), "--format", "rtstruct", "--format", "dicom-seg",
                          "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["succeeded"] == 2
    assert pydicom.dcmread(out / "ct5n" / "rtstruct.dcm").Modality == "RTSTRUCT"
    assert pydicom.dcmread(out / "ct5n" / "seg.dcm").Modality == "SEG"
    from dicom_corpus import check_exports

    names = {int(k): v for k, v in json.loads((out / "ct5n" / "report.json").read_text())["labels"].items()}
    check_exports(out / "ct5n" / "seg.dcm", out / "ct5n" / "rtstruct.dcm", out / "ct5n" / "mask.nii.gz", series,
                  names)
    case = nifti.name[: -len(".nii.gz")]
    assert (out / case / "mask.nii.gz").is_file() and not (out / case / "rtstruct.dcm").exists()
    assert f"{case}: succeeded: no rtstruct, dicom-seg result: the input was not DICOM" in run.stderr


def test_two_workers_share_one_queue(stack, phantom_dataset):
    """Runs late in the module: the stack keeps its second worker afterwards."""
    base = stack.url
    stack.start_worker("w2")
    stack.wait_for_workers(2)
    ids = [submit(base, scan(phantom_dataset, k % 2)).json()["id"] for k in range(6)]
    jobs = [wait_final(base, i) for i in ids]
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    assert {j["worker"] for j in jobs} == {"w1@localstack", "w2@localstack"}


def test_a_job_delivered_too_often_ends_failed_with_a_reason(redis_url):
    from jobstore.records import JobState
    from jobstore.store import JobStore

    store = JobStore(redis_url)
    job, _ = store.create("alpha", [], {"model": "tiny"})
    for k in range(3):  # each time a new worker process whose predecessor died (its lease lapsed)
        assert store.deliver(job.id, 3, f"elsewhere:{k}", 30, holder_alive=lambda h: False)[1] == "run"
    final, action = store.deliver(job.id, 3, "elsewhere:9", 30, holder_alive=lambda h: False)
    assert action == "poison" and final.state == JobState.FAILED and "3 times" in final.error
    assert [a.outcome for a in final.attempts] == ["its worker stopped"] * 2 + [None]
    assert store.deliver(job.id, 3, "elsewhere:10", 30)[1] == "skip"


def test_a_second_delivery_of_a_running_job_is_not_run(redis_url):
    """The lease: while its holder lives, copies of the job (visibility timeout, reconnects) are not run;
    once the lease lapses, the orphan is requeued and sent once."""
    from jobstore.records import JobState, now
    from jobstore.store import JobStore

    store = JobStore(redis_url)
    job, _ = store.create("alpha", [], {"model": "tiny", "priority": 5})
    assert store.deliver(job.id, 3, "host-a:1", 2)[1] == "run"
    assert store.deliver(job.id, 3, "host-b:2", 2)[1] == "duplicate"
    assert store.get(job.id).state == JobState.RUNNING and store.duplicates(job.id) == 1
    assert store.renew(job.id, "host-a:1", 2) and not store.renew(job.id, "host-b:2", 2)
    sent = []
    assert store.requeue_orphans(lambda i, p: sent.append(i)) == [] and sent == []  # lease held: not an orphan
    time.sleep(2.2)  # the holder stops renewing: the lease lapses
    time.sleep(store.next_sweep_in())
    assert store.requeue_orphans(lambda i, p: sent.append(i)) == [job.id] and sent == [job.id]
    assert store.get(job.id).state == JobState.QUEUED and store.position(job.id) is not None
    assert store.deliver(job.id, 3, "host-b:2", 2)[1] == "run"
    store.finish(job.id, "host-b:2", state=JobState.SUCCEEDED, finished=now())
    done = store.get(job.id)
    assert [a.outcome for a in done.attempts] == ["its worker stopped", "succeeded"] and done.state.final
    assert store.deliver(job.id, 3, "host-c:3", 2)[1] == "skip"
    assert store.lease_holder(job.id) is None


def test_service_refuses_to_start_without_keys():
    from service.settings import DEV_KEY, Settings

    with pytest.raises(ValueError, match="no API keys"):
        Settings(api_keys="").tenants_by_key_hash()
    with pytest.raises(ValueError, match="development key"):
        Settings(api_keys=f"a:{hash_key(DEV_KEY)}").tenants_by_key_hash()
    with pytest.raises(ValueError, match="not tenant"):
        Settings(api_keys="a:1234").tenants_by_key_hash()
    assert Settings(api_keys="", dev_mode=True).tenants_by_key_hash() == {hash_key(DEV_KEY): "dev"}


def test_openapi_documents_every_route_and_field(service):
    base, _ = service
    with client() as c:
        schema = c.get(base + "/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            assert op.get("summary"), f"{method.upper()} {path} has no summary"
            if path not in ("/healthz", "/readyz"):
                assert "401" in op["responses"], f"{method.upper()} {path} does not document 401"
    for name, model in schema["components"]["schemas"].items():
        if name in ("JobView", "JobList", "BatchView", "Problem"):
            for field, spec in model["properties"].items():
                assert spec.get("description"), f"{name}.{field} has no description"


@pytest.mark.subprocess
def test_service_never_imports_torch():
    # the API, the DIMSE listener, and what the limited child reads uploads, studies and corrections with
    code = ("import sys, service.app, service.metrics, service.client, service.dimse, service.validate, "
            "imaging.io, imaging.dicom, imaging.sequences, imaging.corrections; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.shared_data
@pytest.mark.redis
@pytest.mark.subprocess
def test_real_hippocampus_scan_through_isl_submit_equals_isl_refine(hippocampus, tmp_path):
    """The committed few-label bundle behind a real API and worker: `isl submit` of a real held-out scan
    returns exactly what `isl refine` makes of it with the worker's settings (one thread)."""
    import json

    from worker.localstack import LocalStack

    case = hippocampus / "imagesTr" / "hippocampus_001.nii.gz"
    with LocalStack(tmp_path / "stack", ROOT / "models", "hippocampus_few", hippocampus, {"alpha": KEYS["alpha"]}) as s:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ISL_")} | {"ISL_API_KEY": KEYS["alpha"]}
        out = subprocess.run([sys.executable, "-m", "worker.cli", "submit", str(case), "--server", s.url, "--out",
                              str(tmp_path / "served"), "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=400)
        assert out.returncode == 0, out.stderr + s.logs()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISL_")} | {"OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "-m", "worker.cli", "refine", str(case), "--model",
                          str(ROOT / "models" / "hippocampus_few"),
                          "--out", str(tmp_path / "local"), "--atlas-dir", str(hippocampus), "--device", "cpu",
                          "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert cli.returncode == 0, cli.stderr
    from imaging.io import read_image

    served = read_image(tmp_path / "served" / "hippocampus_001" / "mask.nii.gz")
    local = read_image(tmp_path / "local" / "mask.nii.gz")
    assert np.array_equal(served.array, local.array)
    assert served.geometry == local.geometry
    report = json.loads((tmp_path / "served" / "hippocampus_001" / "report.json").read_text())
    assert report["volumes_ml"] == json.loads((tmp_path / "local" / "report.json").read_text())["volumes_ml"]
