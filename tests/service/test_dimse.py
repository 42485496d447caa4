"""DIMSE against real peers: Orthanc sends a study to `isl dicom-listener` by C-STORE (its REST call to a modality)
and dcmtk's `storescu` sends a series; each series becomes a job of the tenant its calling AE title belongs to, and
the worker sends the SEG and the RTSTRUCT back to Orthanc by C-STORE, where they are listed under the same study.
A calling AE title that no tenant has is refused at association; a series the engine cannot read becomes a failed
job that says why; a listener killed mid-series loses nothing it acknowledged."""
import copy
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
from kit import orthanc as run_orthanc
from pydicom.uid import generate_uid

from worker.localstack import free_port, wait_until

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
KEY = {"pacs": "pacs-secret-key", "other": "other-secret-key"}
QUIET_S = 4
FIXTURE_NEEDS = {"peers": (pytest.mark.dicom_peer("Orthanc", "storescu", "dciodvfy"), "redis", "subprocess")}


@pytest.fixture(scope="module")
def peers(tiny_bundle, phantom_dataset, tmp_path_factory):
    from worker.localstack import LocalStack

    folder = tmp_path_factory.mktemp("dimse")
    http_port, orthanc_dicom, listener, closed = free_port(), free_port(), free_port(), free_port()
    env = {"ISL_DIMSE_PORT": str(listener), "ISL_DIMSE_QUIET_S": str(QUIET_S),
           "ISL_DIMSE_CALLING_AETS": "pacs:ORTHANC|STORESCU,other:OTHERPACS",
           "ISL_DIMSE_DESTINATIONS": f"pacs=ORTHANC@127.0.0.1:{orthanc_dicom},other=NOBODY@127.0.0.1:{closed}",
           "ISL_PUSH_RETRY_S": "0.5"}
    stack = LocalStack(folder / "stack", tiny_bundle.parent, tiny_bundle.name, phantom_dataset, KEY, extra_env=env)
    modalities = {"isl": ["ISL", "127.0.0.1", listener]}
    with run_orthanc(folder, http_port, orthanc_dicom, DicomAet="ORTHANC", DicomModalities=modalities) as url, stack:
        stack.start_listener()
        try:
            yield url, stack, listener
        finally:
            print(stack.logs())


def _jobs(stack, tenant="pacs"):
    with httpx.Client(headers={"X-API-Key": KEY[tenant]}, timeout=30) as c:
        return {j["id"]: j for j in c.get(stack.url + "/v1/jobs").json()["jobs"]}


def _new_final_job(stack, before, timeout=240):
    """The one job that appeared since `before`, once it ended."""
    new = wait_until(lambda: set(_jobs(stack)) - set(before), QUIET_S + 30, "the job of the sent series")
    assert len(new) == 1, new
    with httpx.Client(headers={"X-API-Key": KEY["pacs"]}, timeout=30) as c:
        return wait_until(lambda: (j := c.get(f"{stack.url}/v1/jobs/{next(iter(new))}").json())["state"]
                          in ("succeeded", "failed") and j, timeout, "the job")


def _series_copy(transform=None):
    """CT5N as a new study and series (new UIDs throughout), each slice through `transform(i, ds)`."""
    study, series = generate_uid(), generate_uid()
    out = []
    for i, f in enumerate(sorted(CT5N.iterdir())):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if transform:
            transform(i, ds)
        out.append(ds)
    return out


def _c_store(datasets, port, calling="STORESCU"):
    """C-STORE the datasets to the listener in one association; the status of each (None: refused)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ISL")
    if not assoc.is_established:
        return None
    try:
        return [assoc.send_c_store(copy.deepcopy(ds)).Status for ds in datasets]
    finally:
        assoc.release()


def test_orthanc_sends_a_study_and_gets_seg_and_rtstruct_back_in_it(peers, tmp_path):
    orthanc, stack, _ = peers
    before, study = _jobs(stack), None
    for f in sorted(CT5N.iterdir()):
        r = httpx.post(orthanc + "/instances", content=f.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        study = r.json()["ParentStudy"]
    r = httpx.post(f"{orthanc}/modalities/isl/store", json={"Resources": [study], "Synchronous": True}, timeout=120)
    assert r.status_code == 200, r.text
    job = _new_final_job(stack, before)
    assert job["state"] == "succeeded" and job["push"] == "ok" and job["received_by"] == "dimse", job
    assert job["input_files"] == 5
    with httpx.Client(headers={"X-API-Key": KEY["other"]}, timeout=30) as c:  # another tenant does not see it
        assert c.get(f"{stack.url}/v1/jobs/{job['id']}").status_code == 404
    with httpx.Client(headers={"X-API-Key": KEY["pacs"]}, timeout=30) as c:  # the audit trail names the listener
        events = c.get(f"{stack.url}/v1/audit", params={"job_id": job["id"]}).json()["events"]
    assert [(e["actor"], e["action"], e["detail"]["instances"]) for e in events] == [("dimse", "submit", 5)]

    def modalities():
        ids = httpx.get(f"{orthanc}/studies/{study}").json()["Series"]
        return sorted(httpx.get(f"{orthanc}/series/{s}").json()["MainDicomTags"].get("Modality", "") for s in ids)

    assert wait_until(lambda: modalities() == ["CT", "RTSTRUCT", "SEG"] and modalities(), 30,
                      "the SEG and the RTSTRUCT in Orthanc's study")
    _check_results(stack, job["id"], tmp_path, CT5N)


def _check_results(stack, job_id, folder, source):
    """The job's SEG and RTSTRUCT pass dciodvfy and read back onto its NIfTI mask (tests/dicom_corpus.py)."""
    from dicom_corpus import check_exports

    with httpx.Client(headers={"X-API-Key": KEY["pacs"]}, timeout=30) as c:
        for fmt, name in (("nifti", "mask.nii.gz"), ("dicom-seg", "seg.dcm"), ("rtstruct", "rt.dcm")):
            (folder / name).write_bytes(c.get(f"{stack.url}/v1/jobs/{job_id}/result", params={"format": fmt}).content)
        names = {int(k): v for k, v in c.get(f"{stack.url}/v1/jobs/{job_id}/report").json()["labels"].items()}
    check_exports(folder / "seg.dcm", folder / "rt.dcm", folder / "mask.nii.gz", source, names)


def test_storescu_sends_a_series_that_becomes_a_job(peers, tmp_path):
    _, stack, port = peers
    before = _jobs(stack)
    (tmp_path / "series").mkdir()
    for i, ds in enumerate(_series_copy()):
        ds.save_as(tmp_path / "series" / f"{i}.dcm")
    run = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "ISL", "127.0.0.1", str(port),
                          *sorted(map(str, (tmp_path / "series").iterdir()))], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    job = _new_final_job(stack, before)
    assert job["state"] == "succeeded" and job["push"] == "ok", job
    _check_results(stack, job["id"], tmp_path, tmp_path / "series")


def test_a_calling_ae_title_no_tenant_has_is_refused_at_association(peers, tmp_path):
    _, stack, port = peers
    dimse = Path(stack.env["ISL_STORAGE_ROOT"]) / "dimse"

    def received():
        return sorted(str(p.relative_to(dimse)) for p in dimse.rglob("*") if p.is_file())

    kept, before = received(), _jobs(stack)
    _series_copy()[0].save_as(tmp_path / "0.dcm")
    run = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "ISL", "127.0.0.1", str(port),
                          str(tmp_path / "0.dcm")], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "Association Rejected" in run.stdout + run.stderr, run
    assert _c_store(_series_copy()[:1], port, calling="INTRUDER") is None
    assert received() == kept and _jobs(stack) == before  # nothing of theirs was kept or queued
    assert _c_store(_series_copy()[:1], port, calling="STORESCU") == [0]  # the same from an allowed title
    assert received() != kept
    assert _new_final_job(stack, before)["input_files"] == 1


def test_a_series_the_engine_cannot_read_becomes_a_failed_job_that_says_why(peers):
    _, stack, port = peers
    before = _jobs(stack)

    def tilt(i, ds):  # 0.87 mm along y per slice: a gantry tilt of about 19 degrees
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.87 * int(ds.InstanceNumber), z]

    assert _c_store(_series_copy(tilt), port) == [0] * 5
    job = _new_final_job(stack, before, timeout=30)
    assert job["state"] == "failed" and "refused before queueing" in job["error"] and "gantry tilt" in job["error"]


def test_a_destination_that_cannot_be_reached_is_tried_again_then_named_on_the_job(peers):
    _, stack, port = peers
    before = _jobs(stack, "other")
    assert _c_store(_series_copy(), port, calling="OTHERPACS") == [0] * 5
    new = wait_until(lambda: set(_jobs(stack, "other")) - set(before), QUIET_S + 30, "the job of tenant other")
    with httpx.Client(headers={"X-API-Key": KEY["other"]}, timeout=30) as c:
        job = wait_until(lambda: (j := c.get(f"{stack.url}/v1/jobs/{next(iter(new))}").json())["state"]
                         in ("succeeded", "failed") and j, 240, "the job")
    assert job["state"] == "succeeded", job  # the result stays available over the API
    assert "C-STORE to NOBODY@127.0.0.1" in job["push"] and "failed after 3 tries" in job["push"], job["push"]


def test_a_listener_killed_mid_series_loses_nothing_it_acknowledged(peers):
    """Killed (SIGKILL) after 3 of a series' 5 instances, restarted, sent the other 2: one job of all 5. And a
    series the listener had claimed but not yet made a job when it died becomes one job on restart."""
    _, stack, port = peers
    before, series, claimed = _jobs(stack), _series_copy(), _series_copy()
    assert _c_store(series[:3], port) == [0] * 3
    stack.kill("listener", signal.SIGKILL)
    folder = Path(stack.env["ISL_STORAGE_ROOT"]) / "dimse" / "claimed" / "pacs" / f"{claimed[0].SeriesInstanceUID}.x"
    (folder / "dicom").mkdir(parents=True)  # what a claim leaves when the listener dies before the job is made
    for ds in claimed:
        ds.save_as(folder / "dicom" / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    stack.start_listener()
    assert _c_store(series[3:], port) == [0] * 2
    store = stack.store()

    def both():
        jobs = [store.get(i) for i in _jobs(stack) if i not in before]
        return len(jobs) == 2 and all(j.state in ("succeeded", "failed") for j in jobs) and jobs

    jobs = wait_until(both, QUIET_S + 240, "the two jobs")
    sent = sorted(sorted(str(ds.SOPInstanceUID) for ds in s) for s in (series, claimed))
    assert sorted(sorted(f.name.split("/")[-1] for f in j.inputs) for j in jobs) == sent
    assert all(j.state == "succeeded" for j in jobs), [j.error for j in jobs]
    assert not folder.exists()


def test_calling_ae_titles_and_destinations_are_checked_naming_the_entry():
    from pydantic import ValidationError

    from service.settings import Settings
    from worker.tasks.dimse import destinations
    from worker.tasks.settings import WorkerSettings

    assert Settings(dimse_calling_aets="a:X|Y, b:Z").tenants_by_calling_aet() == {"X": "a", "Y": "a", "Z": "b"}
    for bad, why in [("a:X,b:X", "given to both 'a' and 'b'"), ("a:", "is not tenant:AET"),
                     ("a:SEVENTEEN_CHARSXX", "is not an AE title"), ("a:BAD\\AE", "is not an AE title")]:
        with pytest.raises(ValueError, match=why):
            Settings(dimse_calling_aets=bad).tenants_by_calling_aet()
    assert destinations("t=PACS@pacs.hospital:104") == {"t": ("PACS", "pacs.hospital", 104)}
    for bad in ("t=PACS@host", "t=PACS", "PACS@host:104", "t=@host:104", "t=PACS@host:0"):
        with pytest.raises(ValueError, match="AET@host:port"):
            destinations(bad)
    with pytest.raises(ValidationError, match="ISL_DIMSE_SEND 'seg'"):
        WorkerSettings(dimse_send="seg")


@pytest.mark.subprocess
def test_the_listener_does_not_start_without_allowed_calling_ae_titles(tmp_path):
    import sys

    env = dict(os.environ, ISL_STORAGE_ROOT=str(tmp_path), ISL_DIMSE_CALLING_AETS="")
    run = subprocess.run([sys.executable, "-m", "worker.cli", "dicom-listener"], capture_output=True, text=True,
                         env=env, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 2 and "ISL_DIMSE_CALLING_AETS is empty" in run.stderr, run.stderr
