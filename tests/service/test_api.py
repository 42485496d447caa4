"""The API in process (FastAPI's TestClient) over a private redis-server: the rules that need no worker, no
uvicorn and no second process (credentials, ownership, error bodies, views, the schema, cancelling and refusing
uploads). What needs real processes is in test_service.py and its neighbours."""
import gzip
import json
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kit import KEYS

from jobstore.records import JobResult, JobState
from service.routes import served
from service.settings import Settings, hash_key

LIMIT = 1 << 20
PROBES = {"/healthz", "/readyz"}


@pytest.fixture
def app(redis_url, tmp_path):
    from service.app import create_app

    models = tmp_path / "models"
    for name, version in (("tiny", "1"), ("other", "2")):
        (models / name).mkdir(parents=True)
        (models / name / "bundle.json").write_text(json.dumps({"version": version, "labels": {"1": "organ"}}))
    (models / "broken").mkdir()
    (models / "broken" / "bundle.json").write_text("{not json")
    keys = ",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items())
    return create_app(Settings(redis_url=redis_url, storage_root=tmp_path / "storage", models_dir=models,
                               default_model="tiny", api_keys=keys, max_upload_bytes=LIMIT,
                               auth_failures=100_000))  # the route table sends hundreds of bad keys on purpose


def client(app, tenant: str | None = "alpha") -> TestClient:
    return TestClient(app, headers={"X-API-Key": KEYS[tenant]} if tenant else {})


def scan_bytes(n: int = 16) -> bytes:
    import nibabel as nib

    arr = np.random.default_rng(0).normal(100, 10, (n, n, n)).astype(np.float32)
    return gzip.compress(nib.Nifti1Image(arr, np.eye(4)).to_bytes())


def new_job(app, tenant: str = "alpha"):
    job, _ = app.state.store.create(tenant, [], {"model": "tiny"})
    return job


def test_every_route_but_the_probes_refuses_a_missing_wrong_or_revoked_key(app):
    app.state.store.revoke(hash_key(KEYS["gamma"]))
    job = new_job(app).id
    for route in served():
        path = route.path.replace("{job_id}", job).replace("{batch_id}", job)
        for method in route.methods:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                            {"X-API-Key": KEYS["gamma"]}, {"Authorization": f"Bearer {KEYS['gamma']}"}):
                r = client(app, None).request(method, path, headers=headers)
                if route.path in PROBES:
                    assert r.status_code == 200, (method, path, r.text)
                    continue
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == 'Bearer realm="isl"'
                assert r.json() == {"detail": "a valid API key is required (X-API-Key header or Authorization: Bearer)"}
    assert client(app, None).get("/v1/jobs", headers={"Authorization": f"Bearer {KEYS['beta']}"}).status_code == 200


def test_another_tenants_job_is_answered_exactly_like_no_job(app):
    theirs, missing = new_job(app, "alpha").id, uuid.uuid4().hex
    beta = client(app, "beta")
    for method, suffix in (("GET", ""), ("GET", "/result"), ("GET", "/report"), ("GET", "/events"), ("DELETE", "")):
        for job_id in (theirs, missing, "not-an-id"):
            r = beta.request(method, f"/v1/jobs/{job_id}{suffix}")
            assert (r.status_code, r.json()) == (404, {"detail": f"no job {job_id}"}), (method, suffix)
    assert beta.get(f"/v1/batches/{theirs}").json() == {"detail": f"no batch {theirs}"}
    assert beta.get("/v1/jobs").json()["total"] == 0
    assert client(app).get(f"/v1/jobs/{theirs}").json()["state"] == "queued"  # the refused cancel did nothing


def test_invalid_requests_get_one_sentence(app):
    c = client(app)
    r = c.get("/v1/jobs", params={"limit": 0})
    assert (r.status_code, r.json()) == (422, {"detail": "query.limit: Input should be greater than or equal to 1"})
    r = c.post("/v1/jobs", data={"priority": "11"})
    assert r.status_code == 422 and r.json() == {
        "detail": "files: Field required; priority: Input should be less than or equal to 9"}
    r = c.get(f"/v1/jobs/{new_job(app).id}/result", params={"format": "png"})  # validated before the job's state
    assert (r.status_code, r.json()["detail"]) == (
        422, "query.format: Input should be 'nifti', 'dicom-seg' or 'rtstruct'")
    r = c.put(f"/v1/jobs/{uuid.uuid4().hex}")
    assert (r.status_code, r.json(), r.headers["allow"]) == (405, {"detail": "Method Not Allowed"}, "DELETE, GET")


def test_models_are_listed_and_an_unknown_one_is_refused(app):
    c = client(app)
    assert c.get("/v1/models").json() == {"default": "tiny", "models": {
        "other": {"version": "2", "labels": {"1": "organ"}, "channels": ["image"], "live": "2"},
        "tiny": {"version": "1", "labels": {"1": "organ"}, "channels": ["image"], "live": "1"}}}  # none retrained yet
    r = c.post("/v1/jobs", files={"files": ("scan.nii.gz", scan_bytes())}, data={"model": "nope"})
    assert (r.status_code, r.json()) == (422, {"detail": "unknown model 'nope'; available: ['other', 'tiny']"})


def test_a_jobs_view_and_links_follow_its_state(app):
    store, storage, c = app.state.store, app.state.storage, client(app)
    job = new_job(app)
    view = c.get(f"/v1/jobs/{job.id}").json()
    assert view["state"] == "queued" and view["queue_position"] == 0 and view["estimated_wait_s"] is None
    assert view["links"] == {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"}
    r = c.get(f"/v1/jobs/{job.id}/report")
    assert (r.status_code, r.json()) == (409, {"detail": f"job {job.id} is queued; results exist once it has "
                                                         "succeeded"})
    out = storage.job_dir(job.id) / "output"
    digest = storage.write_bytes(out / "mask.nii.gz", b"mask bytes")
    storage.write_bytes(out / "report.json", json.dumps({"volumes_ml": {"organ": 1.5}}).encode())
    result = JobResult(files={"mask": {"path": "mask.nii.gz", "sha256": digest}}, model_version="1")
    store.update(job.id, state=JobState.SUCCEEDED, progress=1.0, result=result)
    view = c.get(f"/v1/jobs/{job.id}").json()
    assert view["state"] == "succeeded" and view["queue_position"] is None
    assert set(view["links"]) == {"self", "events", "result", "report"}
    r = c.get(view["links"]["result"])
    assert r.content == b"mask bytes" and r.headers["digest"] == f"sha-256={digest}"
    assert c.get(view["links"]["report"]).json() == {"volumes_ml": {"organ": 1.5}}
    assert c.get(view["links"]["result"], params={"format": "dicom-seg"}).status_code == 404
    (out / "mask.nii.gz").write_bytes(b"tampered")
    r = c.get(view["links"]["result"])
    assert r.status_code == 500 and "fails its checksum" in r.json()["detail"]
    events = c.get(view["links"]["events"])
    assert events.text.startswith("event: job\ndata: ")
    assert json.loads(events.text.split("data: ")[1])["state"] == "succeeded"


def test_openapi_documents_401_everywhere_but_the_probes(app):
    assert client(app, None).get("/openapi.json").status_code == 401
    schema = client(app).get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert op["summary"], (method, path)
            codes = set(op["responses"])
            assert ("401" in codes) == (path not in PROBES), (method, path)
            assert {"503", "507"} <= codes or method != "post", (method, path)
    assert {"HTTPValidationError", "ValidationError"}.isdisjoint(schema["components"]["schemas"])


def test_an_upload_is_queued_once_and_a_queued_job_cancelled_never_starts(app):
    c = client(app)
    first = c.post("/v1/jobs", files={"files": ("scan.nii.gz", scan_bytes())}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert first.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] == "queued"
    assert job["queue_position"] == 0 and job["model"] == "tiny"
    again = c.post("/v1/jobs", files={"files": ("scan.nii.gz", scan_bytes())}, headers={"Idempotency-Key": "k1"})
    assert again.json()["id"] == job["id"] and c.get("/v1/jobs").json()["total"] == 1
    cancelled = c.delete(f"/v1/jobs/{job['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["started"] is None and cancelled["finished"]
    record = app.state.store.get(job["id"])
    assert record.cancel_requested and record.state.final and app.state.store.queue_depth() == 0
    assert record.inputs[0].kind == "nifti-gz" and record.inputs[0].name == "scan.nii.gz"
    assert c.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"  # cancelling again changes nothing
    metrics = c.get("/metrics").text
    assert 'isl_jobs{state="cancelled"} 1.0' in metrics and 'isl_queue_depth{queue="isl"} 0.0' in metrics


def test_a_batch_with_one_bad_case_queues_none(app):
    c, good = client(app), scan_bytes()
    bad = c.post("/v1/batches", files=[("files", ("a.nii.gz", good)), ("files", ("b.nii.gz", good)),
                                       ("files", ("junk.nii.gz", b"not a scan" * 60))])
    assert bad.status_code == 422 and "junk.nii.gz" in bad.json()["detail"]
    assert c.get("/v1/jobs").json()["total"] == 0 and app.state.store.queue_depth() == 0
    staging = app.state.settings.storage_root / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    r = c.post("/v1/batches", files=[("files", ("a.nii.gz", good)), ("files", ("b.nii.gz", good))])
    assert r.status_code == 202, r.text
    batch = r.json()
    assert r.headers["location"] == f"/v1/batches/{batch['id']}"
    assert batch["counts"] == {"queued": 2} and not batch["done"] and len(batch["jobs"]) == 2
    assert client(app, "beta").get(f"/v1/batches/{batch['id']}").status_code == 404


def test_uploads_over_the_limit_get_413(app):
    c = client(app)
    r = c.post("/v1/jobs", files={"files": ("big.nii", b"\0" * (LIMIT + (2 << 20)))})
    assert r.status_code == 413 and r.json()["detail"].startswith("the request body of ")  # its declared length
    r = c.post("/v1/jobs", files={"files": ("big.nii", b"\0" * 344 + b"n+1\0" + b"\0" * LIMIT)})
    assert (r.status_code, r.json()) == (413, {"detail": f"upload exceeds the limit of {LIMIT} bytes"})


def test_probes_and_metrics_read_the_store(app):
    store = app.state.store
    assert client(app, None).get("/readyz").json() == {"ready": True, "redis": True, "database": True,
                                                       "storage": True, "down": []}
    store.beat("node-1", 30)
    store.record_stage_seconds({"finetune": 2.5})
    store.record_stage_seconds({"finetune": 1.5})
    store.count("requeued")
    text = client(app).get("/metrics").text
    for line in ('isl_stage_seconds_total{stage="finetune"} 4.0', 'isl_stage_runs_total{stage="finetune"} 2.0',
                 'isl_job_events_total{event="requeued"} 1.0', 'isl_worker_heartbeat_age_seconds{worker="node-1"}'):
        assert line in text, line


def test_a_retraining_is_queued_once_per_tenant_and_model_and_read_by_its_tenant_only(app):
    c = client(app)
    assert c.post("/v1/models/nope/retrain").status_code == 404
    for bad in ({"iterations": 0}, {"margin": 2}, {"epochs": 5}):
        r = c.post("/v1/models/tiny/retrain", json=bad)
        assert r.status_code == 422 and len(r.json()["detail"]) < 300, r.text
    r = c.post("/v1/models/tiny/retrain", json={"iterations": 50})
    assert r.status_code == 202 and r.json()["state"] == "queued", r.text
    training_id = r.json()["id"]
    assert r.headers["Location"] == f"/v1/models/tiny/trainings/{training_id}"
    again = c.post("/v1/models/tiny/retrain")
    assert again.status_code == 409 and "already queued or running" in again.json()["detail"]
    assert client(app, "beta").post("/v1/models/tiny/retrain").status_code == 202  # each tenant its own
    row = c.get(f"/v1/models/tiny/trainings/{training_id}").json()
    assert (row["state"], row["parent_version"], row["options"]) == ("queued", "1", {"iterations": 50})
    assert client(app, "beta").get(f"/v1/models/tiny/trainings/{training_id}").status_code == 404
    assert c.get(f"/v1/models/other/trainings/{training_id}").status_code == 404
    assert [t["id"] for t in c.get("/v1/models/tiny/trainings").json()["trainings"]] == [training_id]
    assert c.get("/v1/models/tiny/versions").json() == {"model": "tiny", "live": "1", "versions": [],
                                                        "base": {"version": "1", "status": "live"}}
    assert c.post("/v1/models/tiny/promote", json={"version": "9"}).status_code == 404
    assert c.post("/v1/models/tiny/promote", json={"version": "1"}).json() == {"model": "tiny", "live": "1"}
    events = c.get("/v1/audit").json()["events"]
    assert [(e["action"], e["detail"].get("training")) for e in events] == [("retrain", training_id),
                                                                            ("promote", None)]
