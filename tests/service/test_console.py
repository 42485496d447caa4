"""The web console's sign-in, sessions, CSRF and job pages, in process (FastAPI's TestClient) over a private
redis-server."""
import re

import pytest
from fastapi.testclient import TestClient
from kit import KEYS

from jobstore.records import JobResult, JobState
from service.settings import Settings, hash_key


@pytest.fixture
def app(redis_url, tmp_path):
    from service.app import create_app

    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "bundle.json").write_text('{"version": "1", "labels": {"1": "organ"}}')
    keys = ",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items())
    return create_app(Settings(redis_url=redis_url, storage_root=tmp_path / "storage", models_dir=models,
                               default_model="tiny", api_keys=keys))


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def signed_in(app, tenant: str = "alpha") -> TestClient:
    c = TestClient(app, follow_redirects=False)
    form = c.get("/console/sign-in")
    r = c.post("/console/sign-in", data={"key": KEYS[tenant], "csrf": csrf_of(form.text)})
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs", r.text
    return c


def test_sign_in_opens_a_strict_http_only_session_and_a_wrong_key_is_refused(app):
    c = TestClient(app, follow_redirects=False)
    assert c.get("/console/jobs").headers["location"] == "/console/sign-in?next=%2Fconsole%2Fjobs"
    form = c.get("/console/sign-in")
    assert form.status_code == 200 and 'type="password"' in form.text and '<label for="key">' in form.text
    wrong = c.post("/console/sign-in", data={"key": "not-a-key", "csrf": csrf_of(form.text)})
    assert wrong.status_code == 401 and "That API key is not valid" in wrong.text and "isl_session" not in c.cookies

    form = c.get("/console/sign-in")
    r = c.post("/console/sign-in", data={"key": KEYS["alpha"], "csrf": csrf_of(form.text)})
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("isl_session="))
    assert {"HttpOnly", "SameSite=strict", "Path=/console"} <= {p.strip() for p in cookie.split(";")}
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert sid not in str(app.state.store._r.keys("*"))  # Redis holds a digest of the session id, not the id
    page = c.get("/console/jobs")
    assert page.status_code == 200 and "tenant <strong>alpha</strong>" in page.text
    assert "<title>Jobs · ISL refinement service</title>" in page.text
    assert "server-timing" in page.headers


def test_a_post_without_its_csrf_token_is_refused(app):
    c = TestClient(app, follow_redirects=False)
    c.get("/console/sign-in")  # the sign-in cookie is set, but the form field is left out: a cross-site post
    r = c.post("/console/sign-in", data={"key": KEYS["alpha"]})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    c = signed_in(app)
    assert c.post("/console/sign-out", data={}).status_code == 403
    assert c.post("/console/sign-out", data={"csrf": "forged"}).status_code == 403
    assert c.get("/console/jobs").status_code == 200  # still signed in
    r = c.post("/console/sign-out", data={"csrf": csrf_of(c.get("/console/jobs").text)})
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    assert c.get("/console/jobs").status_code == 303  # signed out
    api = TestClient(app, headers={"X-API-Key": KEYS["alpha"]})
    trail = [e["action"] for e in api.get("/v1/audit", params={"limit": 100}).json()["events"]]
    assert trail.count("sign_in") == 1 and trail.count("sign_out") == 1


def test_a_tenant_sees_its_own_jobs_only_and_a_revoked_key_ends_its_sessions(app):
    store = app.state.store
    mine, _ = store.create("alpha", [], {"model": "tiny"})
    theirs, _ = store.create("beta", [], {"model": "tiny"})
    store.update(mine.id, state=JobState.FAILED, error="the scan is not a 3D image")
    c = signed_in(app)
    page = c.get("/console/jobs").text
    assert mine.id in page and theirs.id not in page and "the scan is not a 3D image" in page
    assert c.get(f"/console/jobs/{mine.id}").status_code == 200
    other = c.get(f"/console/jobs/{theirs.id}")
    assert other.status_code == 404 and theirs.id in other.text and "for your tenant" in other.text
    assert c.get("/console/jobs/not-a-job").status_code == 404
    assert mine.id not in c.get("/console/jobs", params={"state": "succeeded"}).text
    assert mine.id in c.get("/console/jobs", params={"state": "failed"}).text
    assert c.get("/console/jobs", params={"state": "nonsense"}).status_code == 422
    forged = c.get("/console/jobs", params={"error": "call 555-0100 to unlock", "status": "500"})
    assert forged.status_code == 200 and "555-0100" not in forged.text  # no message or status from the URL

    store.revoke(hash_key(KEYS["alpha"]))
    assert c.get("/console/jobs").status_code == 303  # the key behind the session is revoked: signed out


def test_every_page_renders_with_50_jobs_listed_and_gives_its_server_time(app):
    """How long a page takes is benchmarks/console_pages.py's question (a wall-clock limit flakes on a busy
    machine); here each page renders, says its server time, and lists 50 jobs of 60."""
    app.state.settings.console_operators = "alpha"
    store = app.state.store
    for i in range(60):
        job, _ = store.create("alpha", [], {"model": "tiny"})
        if i % 3 == 0:
            store.update(job.id, state=JobState.SUCCEEDED, progress=1.0)
    c = signed_in(app)
    for path in ("/console/jobs", f"/console/jobs/{job.id}", "/console/models", "/console/models/tiny",
                 "/console/operations"):
        _timed(c, path)  # 200, with its Server-Timing header
    assert c.get("/console/jobs").text.count('<tr id="job-') == 50


def _timed(c, path: str) -> float:
    """The server's own time for the page (its Server-Timing header: reading the records and rendering), seconds."""
    r = c.get(path)
    assert r.status_code == 200, (path, r.text)
    return float(re.fullmatch(r"render;dur=([0-9.]+)", r.headers["server-timing"]).group(1)) / 1000


QA = {"method": "isl", "configuration": {"method": "isl", "reason": "it beat the network on 7 of 9 cases"},
      "atlases_used": ["case_1", "case_2", "correction:ab12"], "atlases_from_corrections": ["correction:ab12"],
      "finetune_steps": 12, "stopped_early": True, "folding_fraction": 0.0002, "baseline_vs_refined_dice": 0.9123,
      "safety": {"fusion_vs_start_dice": {"organ": 0.85}, "network_vs_start_dice": {"organ": 0.93},
                 "weights": {"fusion": {"organ": 0.2}, "network": {"organ": 0.8}, "start": {"organ": 0.0}}}}


def test_a_finished_job_shows_its_slices_volumes_timings_and_downloads_to_its_tenant_only(app):
    """The worker's outputs (here made by the same functions: the report and the preview slices) on the job page."""
    import json

    import numpy as np
    import SimpleITK as sitk

    from imaging.io import Geometry
    from imaging.preview import render_previews

    store, storage = app.state.store, app.state.storage
    job, _ = store.create("alpha", [], {"model": "tiny"})
    output = storage.job_dir(job.id) / "output"
    arr = np.random.default_rng(0).normal(100, 10, (16, 20, 24)).astype(np.float32)
    mask = np.zeros(arr.shape, np.uint8)
    mask[4:12, 5:15, 6:18] = 1
    index = render_previews(arr, mask, mask, Geometry.of(sitk.GetImageFromArray(arr)), output / "preview")
    (output / "report.json").write_text(json.dumps({"volumes_ml": {"organ": 0.96}, "baseline_volumes_ml":
                                                    {"organ": 0.9}, "seconds": {"finetune": 2.5, "total": 4.0},
                                                    "preview": {"written": True}, "qa": QA}))
    (output / "mask.nii.gz").write_bytes(b"\x1f\x8b the mask")
    digest = storage.sha256(output / "mask.nii.gz")
    store.update(job.id, state=JobState.SUCCEEDED, progress=1.0,
                 result=JobResult(files={"mask": {"path": "mask.nii.gz", "sha256": digest}}))
    c = signed_in(app)
    page = c.get(f"/console/jobs/{job.id}").text
    assert "<td>organ</td><td>0.90</td><td>0.96</td>" in page and "<td>finetune</td><td>2.5</td>" in page
    assert "<dt>Atlases used</dt><dd>3, 1 of them your radiologists' corrections" in page
    assert "12 steps, stopped early" in page and "0.020% of the deformation" in page and "Dice 0.912" in page
    assert "<td>organ</td><td>0.850</td><td>0.930</td>" in page and "<td>0.2</td><td>0.8</td><td>0.0</td>" in page
    first = index["planes"]["axial"][len(index["planes"]["axial"]) // 2]["file"]
    assert f'src="/console/jobs/{job.id}/preview/{first}"' in page and 'type="range"' in page
    image = c.get(f"/console/jobs/{job.id}/preview/{first}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/console/jobs/{job.id}/preview/..%2Freport.json").status_code == 404
    assert c.get(f"/console/jobs/{job.id}/preview/axial_99.png").status_code == 404
    mask = c.get(f"/console/jobs/{job.id}/download/nifti")
    assert mask.status_code == 200 and mask.content == b"\x1f\x8b the mask" and "download/dicom-seg" not in page
    assert mask.headers["digest"] == f"sha-256={digest}"
    report = c.get(f"/console/jobs/{job.id}/download/report")
    assert report.json()["volumes_ml"] == {"organ": 0.96} and "attachment" in report.headers["content-disposition"]
    assert c.get(f"/console/jobs/{job.id}/download/dicom-seg").status_code == 404  # a NIfTI input has none
    api = TestClient(app, headers={"X-API-Key": KEYS["alpha"]})
    downloads = [e["detail"] for e in api.get("/v1/audit", params={"action": "download"}).json()["events"]]
    assert [d["format"] for d in downloads] == ["nifti", "report"]
    (output / "mask.nii.gz").write_bytes(b"tampered")
    assert c.get(f"/console/jobs/{job.id}/download/nifti").status_code == 500  # not served, as by the API
    beta = signed_in(app, "beta")
    assert beta.get(f"/console/jobs/{job.id}/download/nifti").status_code == 404
    assert beta.get(f"/console/jobs/{job.id}").status_code == 404
    assert beta.get(f"/console/jobs/{job.id}/preview/{first}").status_code == 404


def test_an_upload_from_the_browser_is_queued_as_by_the_api_and_a_bad_one_is_shown_its_reason(app):
    from test_api import scan_bytes

    c = signed_in(app)
    page = c.get("/console/jobs").text
    assert '<option value="tiny" selected>tiny</option>' in page and 'enctype="multipart/form-data"' in page
    files = {"files": ("scan.nii.gz", scan_bytes())}
    assert c.post("/console/jobs", files=files, data={"model": "tiny"}).status_code == 403  # no CSRF token
    r = c.post("/console/jobs", files=files, data={"model": "tiny", "csrf": csrf_of(page)})
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job = app.state.store.get(job_id)
    assert job.tenant == "alpha" and job.state == JobState.QUEUED and job.options.model == "tiny"
    assert "queued" in c.get(r.headers["location"]).text

    bad = c.post("/console/jobs", files={"files": ("notes.txt", b"not a scan")}, data={"csrf": csrf_of(page)})
    assert bad.status_code == 422 and "The upload was refused:" in bad.text and 'role="alert"' in bad.text
    unknown = c.post("/console/jobs", files=files, data={"model": "nope", "csrf": csrf_of(page)})
    assert unknown.status_code == 422 and "unknown model &#39;nope&#39;" in unknown.text


def test_a_correction_needs_the_csrf_token_and_a_finished_job(app):
    c = signed_in(app)
    job, _ = app.state.store.create("alpha", [], {"model": "tiny"})
    token = csrf_of(c.get("/console/jobs").text)
    mask = {"file": ("mask.nii.gz", b"\x1f\x8b")}
    assert c.post(f"/console/jobs/{job.id}/correction", files=mask).status_code == 403
    r = c.post(f"/console/jobs/{job.id}/correction", files=mask, data={"csrf": token})
    assert r.status_code == 409 and "The correction was refused: job" in r.text and "is queued" in r.text


def test_the_pages_follow_their_jobs_by_server_sent_events_of_the_callers_jobs_only(app):
    store = app.state.store
    mine, _ = store.create("alpha", [], {"model": "tiny"})
    theirs, _ = store.create("beta", [], {"model": "tiny"})
    store.update(mine.id, state=JobState.SUCCEEDED, progress=1.0)
    store.update(theirs.id, state=JobState.SUCCEEDED, progress=1.0)
    c = signed_in(app)
    with c.stream("GET", "/console/events", params={"ids": f"{mine.id},{theirs.id},junk"}) as r:
        body = "".join(r.iter_text())
    assert r.headers["content-type"].startswith("text/event-stream")
    assert body.count("event: job") == 1 and mine.id in body and theirs.id not in body and body.endswith(
        "event: end\ndata: {}\n\n")
    assert 'data-job="' + mine.id + '" data-final="yes"' in c.get("/console/jobs").text



def test_the_models_pages_show_versions_and_agreement_and_promote_by_the_apis_rule(app):
    c = signed_in(app)
    listing = c.get("/console/models")
    assert listing.status_code == 200 and '<a href="/console/models/tiny">tiny</a> (default)' in listing.text
    page = c.get("/console/models/tiny")
    assert page.status_code == 200 and "trained from scratch" in page.text and "No correction of this model yet" in (
        page.text)
    assert 'value="1" checked' in page.text  # the base bundle is live
    assert c.get("/console/models/nope").status_code == 404
    token = csrf_of(page.text)
    assert c.post("/console/models/tiny/promote", data={"version": "1"}).status_code == 403
    refused = c.post("/console/models/tiny/promote", data={"version": "9", "csrf": token})
    assert refused.status_code == 404 and "Not promoted: no version &#39;9&#39; of model &#39;tiny&#39;" in refused.text
    done = c.post("/console/models/tiny/promote", data={"version": "1", "csrf": token})
    assert done.status_code == 303 and done.headers["location"] == "/console/models/tiny?promoted=true"
    assert "Version 1 is live for your tenant." in c.get(done.headers["location"]).text
    assert c.get("/console/models/tiny/bland-altman.png").status_code == 404  # no corrections yet
    assert "keeps no training curve" in page.text and "segmentation not recorded" in page.text


def test_the_model_page_draws_the_bundles_training_curves(app, tmp_path):
    import json

    bundle = app.state.settings.models_dir / "tiny" / "bundle.json"
    bundle.write_text(json.dumps({"version": "1", "labels": {"1": "organ"}, "training": {
        "segmentation_final_loss": 0.2, "registration_final_loss": 1.0,
        "curves": {"segmentation": [[10, 0.9], [20, 0.5], [30, 0.2]], "registration": [[5, 1.4], [10, 1.0]]}}}))
    page = signed_in(app).get("/console/models/tiny").text
    assert page.count("<polyline") == 2 and "keeps no training curve" not in page
    assert "Segmentation network's training loss: 0.9000 at the start, 0.2000 after 30 iterations" in page
    points = re.search(r'<polyline points="([^"]+)"', page).group(1).split()
    assert len(points) == 3 and float(points[0].split(",")[1]) < float(points[-1].split(",")[1])  # falls: y grows
    assert "Training curves of version 1</h2>" in page

    # a retrained version live for this tenant: the page draws the curves of what the tenant's jobs run on
    import time as clock

    records, root = app.state.store.records, app.state.settings.storage_root
    folder = root / "models" / "alpha" / "tiny-r1"
    folder.mkdir(parents=True)
    (folder / "bundle.json").write_text(json.dumps({"version": "tiny-r1", "training": {
        "curves": {"segmentation": [[50, 0.4], [100, 0.1]]}}}))
    now = clock.time()
    records.add_training({"id": "t1", "tenant": "alpha", "model": "tiny", "actor": "alpha", "created": now,
                          "parent_version": "1", "options": {}}, {"tenant": "alpha", "actor": "alpha",
                                                                  "action": "retrain", "detail": {}})
    assert records.claim_training("t1", "w", now - 60, now)
    assert records.finish_training("t1", "w", state="succeeded", finished=now, outcome={"promoted": True},
                                   version={"id": "t1", "tenant": "alpha", "model": "tiny", "version": "tiny-r1",
                                            "parent": "1", "folder": "models/alpha/tiny-r1", "created": now})
    page = signed_in(app).get("/console/models/tiny").text
    assert "Training curves of version tiny-r1 (retrained, live for you)</h2>" in page and page.count("<polyline") == 1
    assert "0.4000 at the start, 0.1000 after 100 iterations" in page
    assert "Training curves of version 1</h2>" in signed_in(app, "beta").get("/console/models/tiny").text


def test_operations_show_workers_queues_and_failures_of_every_tenant_to_operators_only(app):
    import time as clock

    app.state.settings.console_operators = "alpha"
    store = app.state.store
    store.beat("gpu-node-3-812", 60, {"device": "cuda:0 (NVIDIA H200)", "node": "gpu-node-3",
                                      "holder": "gpu-node-3:812"})
    busy, _ = store.create("alpha", [], {"model": "tiny"})
    assert store.deliver(busy.id, 3, "gpu-node-3:812", 60)[1] == "run"  # as a worker takes it
    store.update(busy.id, stage="finetune", progress=0.5)
    failed, _ = store.create("beta", [], {"model": "tiny"})
    store.update(failed.id, state=JobState.FAILED, error="the scan has 2 dimensions; a 3D image is needed",
                 finished=clock.time())
    store.create("gamma", [], {"model": "tiny"})
    page = signed_in(app).get("/console/operations")
    assert page.status_code == 200
    assert "<td>gpu-node-3-812</td><td>gpu-node-3</td><td>cuda:0 (NVIDIA H200)</td>" in page.text
    assert f"{busy.id[:12]} (alpha, finetune, 50%)" in page.text
    assert "<td>beta</td>" in page.text and "a 3D image is needed" in page.text
    assert "<td>refinement jobs (<code>isl</code>)</td><td>1</td><td>1</td>" in page.text
    assert "<td>retrainings (<code>train</code>)</td>\n    <td>0</td><td>0</td>" in page.text
    store.records.add_training({"id": "t1", "tenant": "beta", "model": "tiny", "actor": "beta", "created": clock.time(),
                                "parent_version": "1", "options": {}},
                               {"tenant": "beta", "actor": "beta", "action": "retrain", "detail": {}})
    assert "<td>retrainings (<code>train</code>)</td>\n    <td>1</td><td>0</td>" in signed_in(app).get(
        "/console/operations").text
    refused = signed_in(app, "beta").get("/console/operations")
    assert refused.status_code == 403 and "ISL_CONSOLE_OPERATORS" in refused.text


PAGES_WITHOUT_TORCH = """
import re, sys
from pathlib import Path
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings, hash_key

redis_url, root = sys.argv[1], Path(sys.argv[2])
(root / "models" / "tiny").mkdir(parents=True)
(root / "models" / "tiny" / "bundle.json").write_text('{"version": "1", "labels": {"1": "organ"}}')
app = create_app(Settings(redis_url=redis_url, storage_root=root / "storage", models_dir=root / "models",
                          default_model="tiny", api_keys="alpha:" + hash_key("k"), console_operators="alpha"))
job, _ = app.state.store.create("alpha", [], {"model": "tiny"})
app.state.store.update(job.id, state="failed", error="test")  # ended: its event stream ends too
c = TestClient(app)
token = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/sign-in").text).group(1)
c.post("/console/sign-in", data={"key": "k", "csrf": token})
for path in ("/console/jobs", f"/console/jobs/{job.id}", "/console/models", "/console/models/tiny",
             "/console/operations", f"/console/events?ids={job.id}"):
    assert c.get(path).status_code == 200, path
assert "torch" not in sys.modules, "torch imported"
"""


@pytest.mark.subprocess
def test_the_console_adds_no_torch_import_to_the_api(redis_url, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", PAGES_WITHOUT_TORCH, redis_url, str(tmp_path)], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_consoles_text_colours_reach_a_contrast_of_7_to_1():
    """WCAG's enhanced contrast (AAA, 7:1) for every text colour of the stylesheet on its background."""
    from pathlib import Path

    css = (Path(__file__).resolve().parents[2] / "service/console/templates/base.html").read_text()
    colours = {name: h if len(h) == 7 else "#" + "".join(2 * c for c in h[1:])
               for name, h in re.findall(r"--(\w+): (#[0-9a-f]{6}|#[0-9a-f]{3})\b", css)}

    def luminance(hex_: str) -> float:
        c = [int(hex_[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    bg = luminance(colours["bg"])
    for name in ("fg", "muted", "accent", "bad", "ok"):
        ratio = (max(bg, luminance(colours[name])) + 0.05) / (min(bg, luminance(colours[name])) + 0.05)
        assert ratio >= 7, (name, round(ratio, 2))
