"""A model of two MR sequences served over HTTP, an ensemble of one network per sequence combined by majority vote: a
job sends one file per sequence (the second on another grid, which the worker co-registers to the first, with the
alignment's QA in the report), or one zip of a DICOM study whose series are assigned to the sequences by description
or by the `sequence_series` field; a job missing a sequence is refused at upload with the sequences the model takes,
and a study whose series cannot be assigned with the study's series listed. A correction is kept with both
sequences (retraining reads both). The model being the default, a study
pushed by STOW-RS or sent by C-STORE is one job, its series assigned to the sequences by description."""
import json
import zipfile

import pytest


@pytest.mark.redis
@pytest.mark.subprocess
def test_a_job_sends_one_file_per_sequence_and_a_missing_one_is_refused_at_upload(two_sequence_dataset, tmp_path):
    import torch
    from kit import KEYS, client, wait_final

    from isl.training.train import BundleTrainConfig, train_bundle
    from worker.demo import QUICK_REFINEMENT, set_refinement
    from worker.localstack import LocalStack, free_port, wait_until

    cfg = BundleTrainConfig(holdout=2, validation=0, name="twoseq", per_sequence=True, combine="vote")
    cfg.training.iterations, cfg.registration.iterations = 30, 20
    train_bundle(two_sequence_dataset, tmp_path / "models" / "twoseq", cfg, torch.device("cpu"),
                 progress=lambda m: None)
    set_refinement(tmp_path / "models" / "twoseq", QUICK_REFINEMENT, two_sequence_dataset)  # 7 jobs: ISL, smaller
    t1, t2 = (two_sequence_dataset / "imagesTr" / f"phantom_000_000{c}.nii.gz" for c in (0, 1))
    dimse = free_port()
    env = {"ISL_DIMSE_PORT": str(dimse), "ISL_DIMSE_QUIET_S": "3", "ISL_DIMSE_CALLING_AETS": "alpha:STORESCU"}
    with LocalStack(tmp_path / "stack", tmp_path / "models", "twoseq", two_sequence_dataset,
                    {"alpha": KEYS["alpha"]}, extra_env=env) as s, client() as c:
        assert c.get(s.url + "/v1/models").json()["models"]["twoseq"]["channels"] == ["T1", "T2"]
        with open(t1, "rb") as a:
            one = c.post(s.url + "/v1/jobs", files=[("files", ("t1.nii.gz", a))])
        assert one.status_code == 422, one.text
        assert one.json()["detail"] == ("the model takes 2 sequences, one file each in this order: T1, T2; 1 given; "
                                        "missing T2 (or one zip of a DICOM study holding a series per sequence)")
        with open(t1, "rb") as a, open(t2, "rb") as b:
            job = c.post(s.url + "/v1/jobs", files=[("files", ("t1.nii.gz", a)), ("files", ("t2.nii.gz", b))])
        assert job.status_code == 202, job.text
        final = wait_final(s.url, job.json()["id"])
        assert final["state"] == "succeeded", s.logs()
        report = c.get(f"{s.url}/v1/jobs/{final['id']}/report").json()
        (q,) = report["qa"]["sequences"]
        assert q["sequence"].startswith("sequence 1 (T2, ") and q["method"].startswith("rigid")
        assert len(report["input"]) == 2 and report["input"][0].endswith("sequence_0/image.nii.gz")
        assert report["model_version"].startswith("twoseq-")  # the ensemble, served as one model
        mask = c.get(f"{s.url}/v1/jobs/{final['id']}/result")
        assert mask.status_code == 200 and mask.content[:2] == b"\x1f\x8b"
        # a radiologist's correction is kept with both sequences, the second on the first one's grid
        fixed = c.post(f"{s.url}/v1/jobs/{final['id']}/correction", files={"file": ("mask.nii.gz", mask.content)})
        assert fixed.status_code == 201, fixed.text
        (kept,) = (tmp_path / "stack").rglob("corrections/*/*/*/label.nii.gz")
        assert sorted(p.name for p in kept.parent.glob("image*")) == ["image.nii.gz", "image_0001.nii.gz"]

        # one DICOM study (a zip of two series): assigned by description, else refused with its series listed, then
        # assigned by the sequence_series field
        study, uids, _ = _study_zip(t1, t2, tmp_path / "study.zip", ("scout", "T2 SPACE sag"))
        with open(study, "rb") as f:
            refused = c.post(s.url + "/v1/jobs", files=[("files", ("study.zip", f))])
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert "no series whose description names sequence T1" in detail and f"{uids[0]} (scout, " in detail
        with open(study, "rb") as f:
            job = c.post(s.url + "/v1/jobs", files=[("files", ("study.zip", f))],
                         data={"sequence_series": json.dumps({"T1": uids[0]})})
        assert job.status_code == 202, job.text
        final = wait_final(s.url, job.json()["id"])
        assert final["state"] == "succeeded", s.logs()
        report = c.get(f"{s.url}/v1/jobs/{final['id']}/report").json()
        (q,) = report["qa"]["sequences"]
        assert q["sequence"].startswith("sequence 1 (T2, ")
        seg = c.get(f"{s.url}/v1/jobs/{final['id']}/result", params={"format": "dicom-seg"})
        assert seg.status_code == 200
        fixed = c.post(f"{s.url}/v1/jobs/{final['id']}/correction", files={"file": ("seg.dcm", seg.content)})
        assert fixed.status_code == 201, fixed.text  # the study read again as the worker read it, its series chosen
        assert len(list((tmp_path / "stack").rglob("corrections/*/*/*/image_0001.nii.gz"))) == 2
        with open(t1, "rb") as a:
            wrong = c.post(s.url + "/v1/jobs", files=[("files", ("t1.nii.gz", a))],
                           data={"sequence_series": json.dumps({"T1": uids[0]})})
        assert wrong.status_code == 422 and "this upload is not one" in wrong.json()["detail"]

        # a PACS: the default model takes two sequences, so a study pushed by STOW-RS, or sent by C-STORE, is one job
        # whose series are assigned by description; a study whose series cannot be assigned is refused, saying why
        def stow(folder):
            body = b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
                            for f in sorted(folder.glob("*.dcm"))) + b"--b0undary--\r\n"
            return c.post(s.url + "/dicomweb/studies", content=body, headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'})

        r = stow(study.with_suffix(""))
        assert r.status_code == 422 and "no series whose description names sequence T1" in r.json()["detail"], r.text
        named, _, datasets = _study_zip(t1, t2, tmp_path / "named.zip", ("T1 MPRAGE", "T2 SPACE sag"))
        other, _, _ = _study_zip(t1, t2, tmp_path / "other.zip", ("T1 MPRAGE", "T2 SPACE sag"))  # a second study
        for f in other.with_suffix("").glob("*.dcm"):
            f.rename(named.with_suffix("") / ("other-" + f.name))
        r = stow(named.with_suffix(""))  # two studies in one request: one job each, their series never mixed
        assert r.status_code == 200, r.text
        jobs = r.headers["X-ISL-Jobs"].split(",")
        assert len(jobs) == 2
        for job_id in jobs:
            final = wait_final(s.url, job_id)
            assert final["state"] == "succeeded", s.logs()
            (q,) = c.get(f"{s.url}/v1/jobs/{job_id}/report").json()["qa"]["sequences"]
            assert q["sequence"].startswith("sequence 1 (T2, ")

        s.start_listener()
        before = {j["id"] for j in c.get(s.url + "/v1/jobs").json()["jobs"]}
        assert _c_store(datasets, dimse) == [0] * len(datasets)
        new = wait_until(lambda: {j["id"] for j in c.get(s.url + "/v1/jobs").json()["jobs"]} - before, 60,
                         "the job of the study sent by C-STORE")
        final = wait_final(s.url, next(iter(new)))
        assert final["state"] == "succeeded", s.logs()
        assert len({j["id"] for j in c.get(s.url + "/v1/jobs").json()["jobs"]} - before) == 1  # not one per series

        # the batch client: `isl submit --sequences` groups CASE_0000, CASE_0001 into one job per case
        from service.client import submit_batch

        files = sorted((two_sequence_dataset / "imagesTr").glob("phantom_00[01]_000?.nii.gz"))
        summary = submit_batch([str(f) for f in files], s.url, KEYS["alpha"], tmp_path / "out", progress=False,
                               sequences=True)
        assert {k: v["state"] for k, v in summary.items()} == {"phantom_000": "succeeded", "phantom_001": "succeeded"}
        assert (tmp_path / "out" / "phantom_001" / "mask.nii.gz").is_file()


def _study_zip(t1, t2, out, descriptions):
    """Both sequences as the DICOM series of one study, in a folder and zipped: (zip, series UIDs, datasets)."""
    import SimpleITK as sitk
    from dicom_corpus import datasets, save
    from pydicom.uid import generate_uid

    study, frame, uids, every = generate_uid(), generate_uid(), [], []
    folder = out.with_suffix("")
    for path, description in zip((t1, t2), descriptions):
        series = datasets(sitk.ReadImage(str(path)), study_uid=study, frame_of_reference=frame)
        for ds in series:
            ds.SeriesDescription = description
        uids.append(series[0].SeriesInstanceUID)
        every += series
        save(series, folder)
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder))
    return out, uids, every


def _c_store(datasets, port):
    """C-STORE the datasets to the listener in one association as STORESCU; the status of each."""
    import copy

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ISL")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(copy.deepcopy(ds)).Status for ds in datasets]
    finally:
        assoc.release()


def test_the_batch_client_groups_sequences_by_their_suffix_and_refuses_a_gap(tmp_path):
    from service.client import ServiceError, group_cases

    paths = [tmp_path / n for n in ("b_0001.nii.gz", "a_0000.zip", "b_0000.nii.gz", "a_0001.zip")]
    assert group_cases(paths, True) == {"b": [paths[2], paths[0]], "a": [paths[1], paths[3]]}
    assert group_cases(paths[:2], False) == {"b_0001": [paths[0]], "a_0000": [paths[1]]}
    with pytest.raises(ServiceError, match=r"case b: sequences \['0001'\]; expected 0000 to 0000"):
        group_cases(paths[:1], True)
    with pytest.raises(ServiceError, match="every file is named CASE_0000"):
        group_cases([tmp_path / "scan.nii.gz"], True)
