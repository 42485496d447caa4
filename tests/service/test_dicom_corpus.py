"""The corpus of non-textbook DICOM series (tests/dicom_corpus.py, made from a real head-and-neck CT of ../shared)
through the CLI (`isl refine` with the committed head-and-neck bundle) and through the service (POST /v1/jobs):
each shape either works, onto the right voxels, with SEG and RTSTRUCT that pass dciodvfy and read back onto the
NIfTI mask, or is refused before any job is queued, with its reason."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared
from dicom_corpus import check_exports, make_corpus, series_uids
from kit import client, wait_final

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "headneck_ct"
pytestmark = [pytest.mark.shared_data, pytest.mark.subprocess]  # `isl refine` of a real CT, and the service
WORKS = ("axial", "sagittal", "coronal", "enhanced", "no_frame_of_reference")
REFUSED = {"gantry_tilt": "gantry tilt of about 18.4 degrees", "missing_slice": "a slice is missing or duplicated",
           "two_series": "2 DICOM series; choose one with a series UID",
           "mixed_orientation": "the slices are not all parallel (1 of"}


def _ct():
    return sitk.ReadImage(str(shared("headneck_ct") / "imagesTr" / "openkbp_002_0000.nii.gz"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The whole CT (128 x 128 x 128 at 4.6 x 4.6 x 3 mm), for the head-and-neck bundle."""
    return make_corpus(_ct(), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 24 x 24 x 16 block of it, for the service's tiny phantom bundle (which resamples to 1 mm)."""
    return make_corpus(_ct()[52:76, 52:76, 60:76], tmp_path_factory.mktemp("small"))


def _refine(source: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "refine", str(source), "--model", str(MODEL), "--out",
                           str(out), "--atlas-dir", str(shared("headneck_ct")), "--threads", "2", *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _lps(mask: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(mask)), "LPS"))


@pytest.fixture(scope="module")
def cli_runs(corpus, tmp_path_factory):
    """Every working shape through `isl refine`: shape -> its output folder."""
    out = tmp_path_factory.mktemp("cli")
    for shape in WORKS:
        run = _refine(corpus[shape], out / shape)
        assert run.returncode == 0, (shape, run.stderr[-3000:])
    return out


@pytest.mark.parametrize("shape", ["sagittal", "coronal", "enhanced"])
def test_cli_segments_each_acquisition_onto_the_same_anatomy(cli_runs, shape):
    """The same voxels acquired another way get the same mask, back on their own grid: every organ the axial
    series shows, with a Dice of at least 0.99 against it."""
    axial, other = _lps(cli_runs / "axial" / "mask.nii.gz"), _lps(cli_runs / shape / "mask.nii.gz")
    assert axial.shape == other.shape
    organs = [v for v in np.unique(axial) if v != 0]
    assert len(organs) >= 5, organs  # the head-and-neck bundle finds most of its 7 organs on this CT
    for v in organs:
        a, b = axial == v, other == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, (v, a.sum(), b.sum(), (a & b).sum())


@pytest.mark.dicom_peer("dciodvfy")
@pytest.mark.parametrize("shape", ["axial", "sagittal", "coronal", "enhanced"])
def test_cli_exports_pass_dciodvfy_and_read_back_onto_the_mask(cli_runs, corpus, shape):
    names = {int(k): v for k, v in json.loads((MODEL / "bundle.json").read_text())["dataset"]["labels"].items()}
    out = cli_runs / shape
    check_exports(out / "seg.dcm", out / "rtstruct.dcm", out / "mask.nii.gz", corpus[shape], names)


def test_cli_a_series_without_frame_of_reference_gets_its_mask_and_the_report_says_why_no_seg(cli_runs):
    out = cli_runs / "no_frame_of_reference"
    report = json.loads((out / "report.json").read_text())
    assert (out / "mask.nii.gz").exists() and not (out / "seg.dcm").exists() and not (out / "rtstruct.dcm").exists()
    assert "FrameOfReferenceUID" in report["dicom_exports"]["not_written_because"]


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_cli_refuses_what_it_cannot_read_with_the_reason(corpus, shape, tmp_path):
    run = _refine(corpus[shape], tmp_path / "out")
    assert run.returncode == 2 and REFUSED[shape] in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "out" / "mask.nii.gz").exists()


def test_cli_takes_one_of_two_series_when_told_which(corpus, tmp_path):
    chosen = series_uids(corpus["two_series"])[0]
    run = _refine(corpus["two_series"], tmp_path / "out", "--series-uid", chosen)
    assert run.returncode == 0, run.stderr[-3000:]


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"study/{f.name}")
    return path


def _upload(stack, archive: Path, **form):
    with client() as c, open(archive, "rb") as fh:
        return c.post(stack.url + "/v1/jobs", files={"files": (archive.name, fh, "application/zip")}, data=form)


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_service_refuses_before_queueing_with_the_reason(stack, small, shape, tmp_path):
    with client() as c:
        before = c.get(stack.url + "/v1/jobs").json()["total"]
    r = _upload(stack, _zip(small[shape], tmp_path / f"{shape}.zip"))
    assert r.status_code == 422 and REFUSED[shape] in r.json()["detail"], r.text
    with client() as c:
        assert c.get(stack.url + "/v1/jobs").json()["total"] == before


def test_service_takes_one_of_two_series_by_its_form_field(stack, small, tmp_path):
    archive = _zip(small["two_series"], tmp_path / "two.zip")
    assert _upload(stack, archive, series_uid="1.2.3").status_code == 422  # not one of its series
    r = _upload(stack, archive, series_uid=series_uids(small["two_series"])[1])
    assert r.status_code == 202, r.text
    assert wait_final(stack.url, r.json()["id"])["state"] == "succeeded"


@pytest.mark.dicom_peer("dciodvfy")
@pytest.mark.parametrize("shape", ["sagittal", "enhanced", "no_frame_of_reference"])
def test_service_refines_each_acquisition_and_serves_its_exports(stack, small, shape, tmp_path):
    r = _upload(stack, _zip(small[shape], tmp_path / f"{shape}.zip"))
    assert r.status_code == 202, r.text
    job = wait_final(stack.url, r.json()["id"])
    assert job["state"] == "succeeded", job
    files = {}
    with client() as c:
        for fmt, name in (("nifti", "mask.nii.gz"), ("dicom-seg", "seg.dcm"), ("rtstruct", "rtstruct.dcm")):
            got = c.get(f"{stack.url}/v1/jobs/{job['id']}/result", params={"format": fmt})
            if shape == "no_frame_of_reference" and fmt != "nifti":
                assert got.status_code == 404 and "FrameOfReferenceUID" in got.json()["detail"], got.text
                continue
            assert got.status_code == 200, got.text
            files[fmt] = tmp_path / name
            files[fmt].write_bytes(got.content)
        names = {int(k): v for k, v in c.get(f"{stack.url}/v1/jobs/{job['id']}/report").json()["labels"].items()}
    if shape != "no_frame_of_reference":
        check_exports(files["dicom-seg"], files["rtstruct"], files["nifti"], small[shape], names)
