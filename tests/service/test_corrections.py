"""Radiologists' corrections over real HTTP (the shared stack: redis-server, `isl serve`, `isl worker`, SQLite):
a corrected NIfTI label map and a DICOM SEG come back through `isl correct` and the API, are stored on the scan's
grid with who sent them and what they changed; a wrong grid, wrong labels, a wrong series and another tenant's
job are refused with the right status and the reason."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from kit import KEYS, client, scan, submit, wait_final

from service.settings import hash_key

ROOT = Path(__file__).resolve().parents[2]
TENANT = "radiology"  # its corrections join its atlas bank: kept apart from alpha, whose jobs other tests compare
CT5N = Path(__import__("pydicom").__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture(scope="module")
def refined(stack, phantom_dataset, tmp_path_factory):
    """A succeeded NIfTI job: (job id, its mask as an ITK image, the folder it was saved in)."""
    folder = tmp_path_factory.mktemp("refined")
    job_id = submit(stack.url, scan(phantom_dataset), tenant=TENANT).json()["id"]
    assert wait_final(stack.url, job_id, tenant=TENANT)["state"] == "succeeded"
    with client(TENANT) as c:
        (folder / "mask.nii.gz").write_bytes(c.get(f"{stack.url}/v1/jobs/{job_id}/result").content)
    return job_id, sitk.ReadImage(str(folder / "mask.nii.gz")), folder


def _save(array: np.ndarray, like: sitk.Image, path: Path, **geometry) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    if array.shape == sitk.GetArrayFromImage(like).shape:
        image.CopyInformation(like)
    for name, value in geometry.items():
        getattr(image, f"Set{name}")(value)
    sitk.WriteImage(image, str(path))
    return path


def _post(stack, job_id: str, path: Path, tenant: str = TENANT):
    with client(tenant) as c, open(path, "rb") as fh:
        return c.post(f"{stack.url}/v1/jobs/{job_id}/correction", files={"file": (path.name, fh)})


def test_a_corrected_label_map_is_stored_on_the_scan_grid_with_who_and_what_changed(stack, refined, phantom_dataset):
    job_id, mask, folder = refined
    auto = sitk.GetArrayFromImage(mask)
    corrected = auto.copy()
    z = int(np.argwhere(auto == 1)[:, 0].mean())
    corrected[z][corrected[z] == 1] = 0  # the radiologist removes label 1 from one slice and draws a block of 2
    corrected[2:5, 2:6, 2:6] = 2
    changed = int(np.count_nonzero(corrected != auto))
    path = _save(corrected, mask, folder / "corrected.nii.gz")
    env = {"ISL_API_KEY": KEYS[TENANT], "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "worker.cli", "correct", job_id, str(path), "--server", stack.url,
                          "--note", "slice fixed"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    made = json.loads(run.stdout)
    assert made["job_id"] == job_id and made["source"] == "nifti" and made["note"] == "slice fixed"
    assert made["voxels_changed"] == changed and made["actor"] == f"key:{hash_key(KEYS[TENANT])[:12]}"
    spacing_ml = float(np.prod(mask.GetSpacing())) / 1000
    report = Path(stack.env["ISL_STORAGE_ROOT"]) / "jobs" / job_id / "output" / "report.json"
    labels = {int(k): v for k, v in json.loads(report.read_text())["labels"].items()}
    assert set(made["per_label"]) == {name for value, name in labels.items() if value}
    for value, name in labels.items():
        if value:
            row = made["per_label"][name]
            assert row["corrected_ml"] == pytest.approx(np.count_nonzero(corrected == value) * spacing_ml, abs=1e-3)
            assert row["refined_ml"] == pytest.approx(np.count_nonzero(auto == value) * spacing_ml, abs=1e-3)
    assert 0 < made["per_label"][labels[1]]["dice_refined_vs_corrected"] < 1
    assert made["per_label"][labels[1]]["hausdorff_mm"] >= made["per_label"][labels[1]]["average_hausdorff_mm"] > 0
    stored = Path(stack.env["ISL_STORAGE_ROOT"]) / "corrections" / TENANT / job_id / made["id"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(stored / "label.nii.gz"))), corrected)
    source = sitk.ReadImage(str(scan(phantom_dataset)))
    image = sitk.ReadImage(str(stored / "image.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))
    assert image.GetSpacing() == pytest.approx(source.GetSpacing())
    with client(TENANT) as c:
        listed = c.get(f"{stack.url}/v1/jobs/{job_id}/corrections").json()["corrections"]
        trail = c.get(f"{stack.url}/v1/audit", params={"job_id": job_id, "action": "correct"}).json()["events"]
    assert [x["id"] for x in listed] == [made["id"]]
    assert [(e["actor"], e["detail"]["correction"]) for e in trail] == [(made["actor"], made["id"])]


def test_corrections_that_do_not_fit_the_job_are_refused_with_the_reason(stack, refined):
    job_id, mask, folder = refined
    auto = sitk.GetArrayFromImage(mask)
    cases = {
        "cropped.nii.gz": (_save(auto[1:], mask, folder / "cropped.nii.gz"), "size"),
        "spacing.nii.gz": (_save(auto, mask, folder / "spacing.nii.gz", Spacing=(9.0, 9.0, 9.0)), "spacing"),
        "moved.nii.gz": (_save(auto, mask, folder / "moved.nii.gz", Origin=(50.0, 0.0, 0.0)), "origin"),
        "label9.nii.gz": (_save(np.where(auto > 0, 9, 0), mask, folder / "label9.nii.gz"), "[9]"),
    }
    (folder / "notes.txt").write_text("not an image at all\n" * 40)
    cases["notes.txt"] = (folder / "notes.txt", "not a NIfTI label map or a DICOM SEG")
    for name, (path, reason) in cases.items():
        r = _post(stack, job_id, path)
        assert r.status_code == 422 and reason in r.json()["detail"] and name in r.json()["detail"], (name, r.text)
    good = _save(auto, mask, folder / "same.nii.gz")
    assert _post(stack, job_id, good, tenant="beta").status_code == 404  # another tenant's job: as no job
    with client(TENANT) as c:  # a job that has no result yet cannot be corrected
        queued = c.post(f"{stack.url}/v1/jobs", files={"files": ("s.nii.gz", (folder / "mask.nii.gz").read_bytes())},
                        data={"priority": "9"}).json()["id"]
        c.delete(f"{stack.url}/v1/jobs/{queued}")
    state = wait_final(stack.url, queued, tenant=TENANT)["state"]
    if state != "succeeded":  # (it may have finished before the cancel reached it)
        r = _post(stack, queued, good)
        assert r.status_code == 409 and state in r.json()["detail"], r.text
    with client(TENANT) as c:
        before = len(c.get(f"{stack.url}/v1/jobs/{job_id}/corrections").json()["corrections"])
    assert _post(stack, job_id, good).status_code == 201  # the same grid and labels: accepted
    with client(TENANT) as c:
        assert len(c.get(f"{stack.url}/v1/jobs/{job_id}/corrections").json()["corrections"]) == before + 1


def test_a_dicom_seg_of_the_jobs_series_corrects_it_and_one_of_another_series_is_refused(stack, refined, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(CT5N.iterdir())
    with client(TENANT) as c:
        handles = [open(f, "rb") for f in files]
        r = c.post(stack.url + "/v1/jobs", files=[("files", (f.name, h)) for f, h in zip(files, handles)])
        for h in handles:
            h.close()
        job = wait_final(stack.url, r.json()["id"], tenant=TENANT)
        assert job["state"] == "succeeded", job
        (tmp_path / "seg.dcm").write_bytes(c.get(f"{stack.url}/v1/jobs/{job['id']}/result",
                                                 params={"format": "dicom-seg"}).content)
    r = _post(stack, job["id"], tmp_path / "seg.dcm")  # the SEG as the radiologist's viewer saved it back
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "dicom-seg" and r.json()["voxels_changed"] == 0
    other = pydicom.dcmread(tmp_path / "seg.dcm")
    other.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    other.save_as(tmp_path / "other.dcm")
    r = _post(stack, job["id"], tmp_path / "other.dcm")
    assert r.status_code == 422 and "not the series this job refined" in r.json()["detail"], r.text
    nifti_job = refined[0]
    r = _post(stack, nifti_job, tmp_path / "seg.dcm")  # a SEG cannot correct a NIfTI job
    assert r.status_code == 422 and "input was NIfTI" in r.json()["detail"], r.text


def test_the_next_refinement_of_the_tenant_selects_the_corrected_case_as_an_atlas(stack, refined, phantom_dataset):
    """With K above the bank's size every atlas is selected: the tenant's latest correction of each job is among
    them at once, named in the report; another tenant's refinement never sees it."""
    job_id, mask, folder = refined
    made = _post(stack, job_id, _save(sitk.GetArrayFromImage(mask), mask, folder / "again.nii.gz")).json()

    def refine(tenant):
        with client(tenant) as c, open(scan(phantom_dataset, 1), "rb") as fh:
            new = c.post(f"{stack.url}/v1/jobs", files={"files": ("s.nii.gz", fh)}, data={"atlases": "64"}).json()
            assert wait_final(stack.url, new["id"], tenant=tenant)["state"] == "succeeded"
            return c.get(f"{stack.url}/v1/jobs/{new['id']}/report").json()["qa"]

    qa = refine(TENANT)
    assert f"correction:{made['id']}" in qa["atlases_from_corrections"], qa["atlases_used"]
    assert set(qa["atlases_from_corrections"]) <= set(qa["atlases_used"])
    assert refine("beta")["atlases_from_corrections"] == []


def test_the_agreement_report_and_its_bland_altman_plot_come_from_the_tenants_corrections(stack, refined, tmp_path):
    """Over HTTP and through `isl agreement`: the batch of the model's version counts the tenant's corrected jobs
    (each once); another tenant's report is empty."""
    job_id, mask, folder = refined
    model = stack.env["ISL_DEFAULT_MODEL"]
    _post(stack, job_id, _save(sitk.GetArrayFromImage(mask), mask, folder / "agree.nii.gz"))
    env = {"ISL_API_KEY": KEYS[TENANT], "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "worker.cli", "agreement", "--model", model, "--server", stack.url,
                          "--png", str(tmp_path / "ba.png")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    with client(TENANT) as c:
        jobs = {x["job_id"] for j in c.get(f"{stack.url}/v1/jobs", params={"limit": 200}).json()["jobs"]
                for x in c.get(f"{stack.url}/v1/jobs/{j['id']}/corrections").json()["corrections"]}
    assert report["model"] == model and sum(b["cases"] for b in report["batches"]) == len(jobs) >= 1
    from service.agreement import MIN_CASES

    rule = report["rule"]  # the rule the report states is the one its verdicts follow
    for batch in report["batches"]:
        if batch["converged"] is None:
            assert batch["why"].endswith(f"the tests need at least {rule['min_cases']}"), (rule, batch)
        else:
            assert batch["converged"] == all(
                not s["volumes_differ"] and s["mean_dice"] >= rule["dice_min"] and
                (s["spearman_rho"] is None or s["spearman_rho"] >= rule["spearman_min"])
                for s in batch["structures"].values()), (rule, batch)

    for batch in report["batches"]:  # the verdict agrees with its reason, and with how many cases the batch has
        opening = {None: f"{batch['cases']} corrected case(s)", True: "no structure's volumes differ"}
        assert (batch["converged"] is None) == (batch["cases"] < MIN_CASES), batch
        assert batch["why"].startswith(opening[batch["converged"]]) if batch["converged"] in opening else (
            ": " in batch["why"] and not batch["why"].startswith("no structure")), batch
    assert (tmp_path / "ba.png").read_bytes().startswith(b"\x89PNG")
    with client(TENANT) as c:  # case metadata at submission splits the batches
        bad = c.post(f"{stack.url}/v1/jobs", files={"files": ("s.nii.gz", (folder / "mask.nii.gz").read_bytes())},
                     data={"metadata": '["not", "an", "object"]'})
        assert bad.status_code == 422 and "metadata" in bad.json()["detail"], bad.text
        r = c.post(f"{stack.url}/v1/jobs", files={"files": ("s.nii.gz", (folder / "mask.nii.gz").read_bytes())},
                   data={"metadata": '{"age_band": "40-60"}'})
        assert wait_final(stack.url, r.json()["id"], tenant=TENANT)["state"] == "succeeded"
        out = c.get(f"{stack.url}/v1/jobs/{r.json()['id']}/result").content
        (tmp_path / "m.nii.gz").write_bytes(out)
        assert _post(stack, r.json()["id"], tmp_path / "m.nii.gz").status_code == 201
        split = c.get(f"{stack.url}/v1/models/{model}/agreement", params={"group_by": "age_band"}).json()
    assert {b["group"]["age_band"]: b["cases"] for b in split["batches"]}.get("40-60") == 1, split
    with client("beta") as c:
        assert c.get(f"{stack.url}/v1/models/{model}/agreement").json()["batches"] == []
        assert c.get(f"{stack.url}/v1/models/{model}/agreement", params={"format": "png"}).status_code == 404
        assert c.get(f"{stack.url}/v1/models/no-such-model/agreement").status_code == 404
