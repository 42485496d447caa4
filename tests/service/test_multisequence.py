"""A model of two MR sequences served over HTTP: a job sends one file per sequence (the second on another grid, which
the worker co-registers to the first, with the alignment's QA in the report); a job missing a sequence, or sending
loose DICOM files for one, is refused at upload with the sequences the model takes."""
import shutil

import pytest


def test_a_job_sends_one_file_per_sequence_and_a_missing_one_is_refused_at_upload(two_sequence_dataset, tmp_path):
    import torch
    from kit import KEYS, client, wait_final

    from worker.localstack import LocalStack
    from worker.training.train import BundleTrainConfig, train_bundle

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    cfg = BundleTrainConfig(holdout=2, validation=0, name="twoseq")
    cfg.training.iterations, cfg.registration.iterations = 30, 20
    train_bundle(two_sequence_dataset, tmp_path / "models" / "twoseq", cfg, torch.device("cpu"),
                 progress=lambda m: None)
    t1, t2 = (two_sequence_dataset / "imagesTr" / f"phantom_000_000{c}.nii.gz" for c in (0, 1))
    with LocalStack(tmp_path / "stack", tmp_path / "models", "twoseq", two_sequence_dataset,
                    {"alpha": KEYS["alpha"]}) as s, client() as c:
        assert c.get(s.url + "/v1/models").json()["models"]["twoseq"]["channels"] == ["T1", "T2"]
        with open(t1, "rb") as a:
            one = c.post(s.url + "/v1/jobs", files=[("files", ("t1.nii.gz", a))])
        assert one.status_code == 422, one.text
        assert one.json()["detail"] == ("the model takes 2 sequences, one file each in this order: T1, T2; 1 given; "
                                        "missing T2")
        with open(t1, "rb") as a, open(t2, "rb") as b:
            job = c.post(s.url + "/v1/jobs", files=[("files", ("t1.nii.gz", a)), ("files", ("t2.nii.gz", b))])
        assert job.status_code == 202, job.text
        final = wait_final(s.url, job.json()["id"])
        assert final["state"] == "succeeded", s.logs()
        report = c.get(f"{s.url}/v1/jobs/{final['id']}/report").json()
        (q,) = report["qa"]["sequences"]
        assert q["sequence"].startswith("sequence 1 (T2, ") and q["method"].startswith("rigid")
        assert len(report["input"]) == 2 and report["input"][0].endswith("sequence_0/image.nii.gz")
        mask = c.get(f"{s.url}/v1/jobs/{final['id']}/result")
        assert mask.status_code == 200 and mask.content[:2] == b"\x1f\x8b"
