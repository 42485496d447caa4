"""A real PACS in the loop: Orthanc with its DICOMweb plugin pushes a study to POST /dicomweb/studies with its own
STOW-RS client; the worker pushes the DICOM SEG back to Orthanc's STOW-RS endpoint; it lands in the same study."""
from pathlib import Path

import httpx
import pytest
from kit import orthanc as run_orthanc

from worker.localstack import free_port, wait_until

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
KEY = {"pacs": "pacs-secret-key"}
pytestmark = [pytest.mark.dicom_peer("Orthanc", "Orthanc's DICOMweb plugin", "dciodvfy"), pytest.mark.redis,
              pytest.mark.subprocess]


@pytest.fixture(scope="module")
def pacs_and_service(tiny_bundle, phantom_dataset, tmp_path_factory):
    from worker.localstack import LocalStack

    folder = tmp_path_factory.mktemp("pacs")
    http_port, dicom_port = free_port(), free_port()
    orthanc = f"http://127.0.0.1:{http_port}"
    stack = LocalStack(folder / "stack", tiny_bundle.parent, tiny_bundle.name, phantom_dataset, KEY,
                       extra_env={"ISL_STOW_URL": f"{orthanc}/dicom-web/studies"})
    dicomweb = {"Enable": True, "Root": "/dicom-web/",
                "Servers": {"isl": {"Url": f"{stack.url}/dicomweb/", "HttpHeaders": {"X-API-Key": KEY["pacs"]}}}}
    with run_orthanc(folder, http_port, dicom_port, Plugins=[str(PLUGIN)], DicomWeb=dicomweb), stack:
        try:
            yield orthanc, stack.url
        finally:
            print(stack.logs())


def test_pacs_pushes_a_study_and_gets_the_seg_back_in_it(pacs_and_service, tmp_path):
    import pydicom

    orthanc, api = pacs_and_service
    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    study = None
    for f in sorted(series.iterdir()):
        r = httpx.post(orthanc + "/instances", content=f.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        study = r.json()["ParentStudy"]
    r = httpx.post(f"{orthanc}/dicom-web/servers/isl/stow", json={"Resources": [study]}, timeout=120)
    assert r.status_code == 200, r.text
    with httpx.Client(headers={"X-API-Key": KEY["pacs"]}, timeout=30) as c:
        jobs = wait_until(lambda: c.get(api + "/v1/jobs").json()["jobs"], 30, "the job of the pushed series")
        assert len(jobs) == 1
        job = wait_until(lambda: (j := c.get(f"{api}/v1/jobs/{jobs[0]['id']}").json())["state"]
                         in ("succeeded", "failed") and j, 240, "the job")
    assert job["state"] == "succeeded" and job["push"] == "ok", job

    def modalities():
        ids = httpx.get(f"{orthanc}/studies/{study}").json()["Series"]
        return sorted(httpx.get(f"{orthanc}/series/{s}").json()["MainDicomTags"].get("Modality", "") for s in ids)

    assert wait_until(lambda: modalities() == ["CT", "SEG"] and modalities(), 30, "the SEG in Orthanc's study")
    from dicom_corpus import check_exports  # the SEG pushed passes dciodvfy and reads back onto the NIfTI mask

    with httpx.Client(headers={"X-API-Key": KEY["pacs"]}, timeout=30) as c:
        for fmt, name in (("nifti", "mask.nii.gz"), ("dicom-seg", "seg.dcm")):
            (tmp_path / name).write_bytes(c.get(f"{api}/v1/jobs/{job['id']}/result", params={"format": fmt}).content)
        names = {int(k): v for k, v in c.get(f"{api}/v1/jobs/{job['id']}/report").json()["labels"].items()}
    check_exports(tmp_path / "seg.dcm", None, tmp_path / "mask.nii.gz", series, names)


def test_stow_refuses_other_content(pacs_and_service):
    _, api = pacs_and_service
    headers = {"X-API-Key": KEY["pacs"]}
    r = httpx.post(api + "/dicomweb/studies", content=b"x", headers=headers | {"Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/related" in r.json()["detail"]
    assert httpx.post(api + "/dicomweb/studies", content=b"x").status_code == 401
