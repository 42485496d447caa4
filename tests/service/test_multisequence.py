"""A model of two MR sequences served over HTTP, an ensemble of one network per sequence combined by majority vote: a
job sends one file per sequence (the second on another grid, which the worker co-registers to the first, with the
alignment's QA in the report); a job missing a sequence is refused at upload with the sequences the model takes."""
import shutil

import pytest


def test_a_job_sends_one_file_per_sequence_and_a_missing_one_is_refused_at_upload(two_sequence_dataset, tmp_path):
    import torch
    from kit import KEYS, client, wait_final

    from worker.localstack import LocalStack
    from worker.training.train import BundleTrainConfig, train_bundle

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    cfg = BundleTrainConfig(holdout=2, validation=0, name="twoseq", per_sequence=True, combine="vote")
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
        assert report["model_version"].startswith("twoseq-")  # the ensemble, served as one model
        mask = c.get(f"{s.url}/v1/jobs/{final['id']}/result")
        assert mask.status_code == 200 and mask.content[:2] == b"\x1f\x8b"

        # the batch client: `isl submit --sequences` groups CASE_0000, CASE_0001 into one job per case
        from service.client import submit_batch

        files = sorted((two_sequence_dataset / "imagesTr").glob("phantom_00[01]_000?.nii.gz"))
        summary = submit_batch([str(f) for f in files], s.url, KEYS["alpha"], tmp_path / "out", progress=False,
                               sequences=True)
        assert {k: v["state"] for k, v in summary.items()} == {"phantom_000": "succeeded", "phantom_001": "succeeded"}
        assert (tmp_path / "out" / "phantom_001" / "mask.nii.gz").is_file()


def test_the_batch_client_groups_sequences_by_their_suffix_and_refuses_a_gap(tmp_path):
    from service.client import ServiceError, group_cases

    paths = [tmp_path / n for n in ("b_0001.nii.gz", "a_0000.zip", "b_0000.nii.gz", "a_0001.zip")]
    assert group_cases(paths, True) == {"b": [paths[2], paths[0]], "a": [paths[1], paths[3]]}
    assert group_cases(paths[:2], False) == {"b_0001": [paths[0]], "a_0000": [paths[1]]}
    with pytest.raises(ServiceError, match=r"case b: sequences \['0001'\]; expected 0000 to 0000"):
        group_cases(paths[:1], True)
    with pytest.raises(ServiceError, match="every file is named CASE_0000"):
        group_cases([tmp_path / "scan.nii.gz"], True)
