"""The `isl` command line on synthetic cases, run as a user would (a subprocess), plus the real golden case."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.subprocess


def isl(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "worker.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_imports_no_torch():
    """Lazy imports keep `isl --help` quick: it loads no torch (its time is benchmarks' to measure)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "worker.cli", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "refine" in out.stdout
    imported = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "argparse" in imported and not [m for m in imported if m.split(".")[0] == "torch"]


def test_refine_writes_mask_and_report(tiny_bundle, phantom_dataset, tmp_path):
    from imaging.io import read_image

    scan = phantom_dataset / "imagesTr" / "phantom_000.nii.gz"
    out = isl("refine", scan, "--model", tiny_bundle, "--out", tmp_path / "out", "--atlas-dir", phantom_dataset,
              "--atlases", 3, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    mask = read_image(tmp_path / "out" / "mask.nii.gz")
    read_image(scan).geometry.check_same(mask.geometry, "mask vs input")
    assert set(np.unique(mask.array)) <= {0, 1, 2}
    assert set(report["volumes_ml"]) == {"head", "tail"}
    voxels = np.count_nonzero(mask.array == 1)
    assert report["volumes_ml"]["head"] == pytest.approx(voxels / 1000.0, abs=1e-3)
    assert report["model_version"].startswith("tiny-")
    seconds = {s: report["seconds"][s] for s in ("read", "baseline", "registration", "finetune", "final", "write",
                                                  "preview", "total")}
    assert seconds["total"] > 0 and all(0 <= v <= seconds["total"] for v in seconds.values()), seconds
    assert 0 <= report["qa"]["folding_fraction"] < 0.05
    assert report["preview"]["written"] and set(report["preview"]["slices"]) == {"axial", "coronal", "sagittal"}
    index = json.loads((tmp_path / "out" / report["preview"]["index"]).read_text())
    assert all((tmp_path / "out" / "preview" / s["file"]).is_file() for v in index["planes"].values() for s in v)


@pytest.mark.dicom_peer("dciodvfy")
def test_dicom_exports_a_series_cannot_reference_are_skipped_with_the_reason_not_the_job(tiny_bundle,
                                                                                          phantom_dataset, tmp_path):
    """A series whose headers lack what a SEG and an RTSTRUCT must reference still gets its mask; the report says
    why there is no DICOM export (a job never fails at export after the mask was computed)."""
    import pydicom

    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    for name, strip in (("whole", False), ("stripped", True)):
        (tmp_path / name).mkdir()
        for i, f in enumerate(sorted(series.iterdir())):
            ds = pydicom.dcmread(f)
            if strip:
                del ds.FrameOfReferenceUID
            ds.save_as(tmp_path / name / f"{i}.dcm")
        out = isl("refine", tmp_path / name, "--model", tiny_bundle, "--out", tmp_path / f"out_{name}",
                  "--atlas-dir", phantom_dataset, "--atlases", 2, "--device", "cpu")
        assert out.returncode == 0, out.stderr
    whole = json.loads((tmp_path / "out_whole" / "report.json").read_text())
    assert whole["dicom_exports"] == {"written": ["dicom_seg", "rtstruct"], "not_written_because": None}
    from dicom_corpus import check_exports

    out = tmp_path / "out_whole"
    check_exports(out / "seg.dcm", out / "rtstruct.dcm", out / "mask.nii.gz", tmp_path / "whole",
                  {int(k): v for k, v in whole["labels"].items()})
    report = json.loads((tmp_path / "out_stripped" / "report.json").read_text())
    assert report["dicom_exports"]["written"] == [] and set(report["files"]) == {"mask", "baseline"}
    assert "lack FrameOfReferenceUID" in report["dicom_exports"]["not_written_because"]
    stripped = tmp_path / "out_stripped"
    assert (stripped / "mask.nii.gz").is_file() and not (stripped / "seg.dcm").exists()


def test_missing_atlas_folder_is_a_clear_error(tiny_bundle, phantom_dataset, tmp_path):
    scan = phantom_dataset / "imagesTr" / "phantom_000.nii.gz"
    out = isl("refine", scan, "--model", tiny_bundle, "--out", tmp_path, "--atlas-dir", tmp_path / "nope",
              "--device", "cpu")
    assert out.returncode == 2
    assert "atlas folder" in out.stderr and "does not exist" in out.stderr


def test_corrupt_input_is_refused_with_exit_2(tiny_bundle, phantom_dataset, tmp_path):
    data = (phantom_dataset / "imagesTr" / "phantom_000.nii.gz").read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(data[: len(data) // 3])
    out = isl("refine", bad, "--model", tiny_bundle, "--out", tmp_path / "o", "--atlas-dir", phantom_dataset,
              "--device", "cpu")
    assert out.returncode == 2 and "truncated" in out.stderr
    assert not (tmp_path / "o" / "mask.nii.gz").exists()


def test_evaluate_writes_the_contract(tiny_bundle, phantom_dataset, tmp_path):
    out = isl("evaluate", "--dataset", phantom_dataset, "--model", tiny_bundle, "--json", tmp_path / "e.json",
              "--cases", 1, "--atlases", 3, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    (case,) = result["cases"]
    assert case["case"] == "phantom_000"  # the first case in sorted order that the model never saw
    for m in ("baseline", "isl", "tta_flip", "tent", "majority_vote", "fusion_only", "network_only"):
        assert set(case[f"dice_{m}"]) == {"head", "tail"}
        assert 0.0 <= result["summary"][f"mean_dice_{m}"] <= 1.0
        assert set(result["summary"]["per_label"]["head"]) >= {m}
    for key in ("wilcoxon_p_isl_vs_baseline", "median_seconds_isl_per_case", "peak_rss_mb", "cases_worsened",
                "config_used"):
        assert key in result["summary"]
    assert result["summary"]["config_used"]["atlases"] == 3  # the option on top of the bundle's configuration
    assert set(case["qa"]["safety"]["weights"]["fusion"]) == {"head", "tail"}
    assert (tmp_path / "e.png").stat().st_size > 10_000


@pytest.mark.shared_data
def test_golden_real_hippocampus_case(hippocampus, tmp_path):
    """A real held-out case through the committed few-label bundle: exit 0 and a Dice floor."""
    from imaging.io import read_image, read_label_map
    from imaging.metrics import dice

    model = ROOT / "models" / "hippocampus_few"
    if not (model / "bundle.json").exists():
        pytest.skip(f"{model} is not trained yet")
    case = "hippocampus_001"
    out = isl("refine", hippocampus / "imagesTr" / f"{case}.nii.gz", "--model", model, "--out", tmp_path,
              "--atlas-dir", hippocampus, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    truth, _ = read_label_map(hippocampus / "labelsTr" / f"{case}.nii.gz", [1, 2])
    scores = dice(read_image(tmp_path / "mask.nii.gz").array, truth.array, [1, 2])
    assert np.mean(list(scores.values())) > 0.75, scores


def test_an_option_the_config_refuses_is_a_clear_error_before_any_work(tiny_bundle, phantom_dataset, tmp_path):
    scan = phantom_dataset / "imagesTr" / "phantom_000.nii.gz"
    out = isl("refine", scan, "--model", tiny_bundle, "--out", tmp_path / "o", "--atlas-dir", phantom_dataset,
              "--atlases", 0, "--device", "cpu")
    assert out.returncode == 2
    assert "--atlases 0: Input should be greater than or equal to 1" in out.stderr, out.stderr
    assert not (tmp_path / "o").exists()
    out = isl("train", "--dataset", phantom_dataset, "--out", tmp_path / "b", "--iterations", -5)
    assert out.returncode == 2 and "--iterations -5" in out.stderr, out.stderr


def test_options_reach_the_config_through_one_table():
    from isl.config import ISLConfig
    from isl.training.train import BundleTrainConfig
    from worker.cli import build_parser
    from worker.commands.model import REFINE_OPTIONS, TRAIN_OPTIONS, config_from

    args = build_parser().parse_args(["train", "--dataset", "d", "--out", "o", "--seed", "7", "--iterations", "9"])
    cfg = config_from(args, BundleTrainConfig, TRAIN_OPTIONS)
    assert (cfg.training.seed, cfg.registration.seed, cfg.training.iterations) == (7, 7, 9)
    assert cfg.registration.iterations == BundleTrainConfig().registration.iterations  # not given: the default
    args = build_parser().parse_args(["refine", "x.nii.gz", "--model", "m", "--out", "o", "--atlases", "5"])
    assert config_from(args, ISLConfig, REFINE_OPTIONS) == ISLConfig(atlases=5)
    args = build_parser().parse_args(["evaluate", "--dataset", "d", "--model", "m", "--json", "j",
                                      "--global-alignment", "similarity"])
    assert config_from(args, ISLConfig, REFINE_OPTIONS).model_dump(exclude_unset=True) == {
        "affine": {"kind": "similarity"}}
