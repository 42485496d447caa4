"""Multi-sequence input: sequences on different grids are rigidly co-registered to the first before they are stacked,
with the quality of each alignment in the report; a missing sequence, or one of another region, is refused with the
reason. End to end through `isl train`, `isl refine` and `isl evaluate`."""
import json
import math

import numpy as np
import pytest


def _moved(volume, degrees: float, shift, spacing: float):
    """`volume` as another acquisition would hold it: turned about z, shifted, on a grid of `spacing` mm."""
    import SimpleITK as sitk

    from imaging.io import Geometry, Volume

    image = volume.to_sitk()
    motion = sitk.Euler3DTransform()
    motion.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    motion.SetRotation(0.0, 0.0, math.radians(degrees))
    motion.SetTranslation(shift)
    grid = sitk.Image([round(n * s / spacing) for n, s in zip(image.GetSize(), image.GetSpacing())], sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    moved = sitk.Resample(image, grid, motion, sitk.sitkLinear, float(volume.array.min()))
    return Volume(sitk.GetArrayFromImage(moved), Geometry.of(moved), "moved.nii.gz")


def test_a_real_sequence_on_another_grid_is_brought_back_onto_the_first(brats_multiseq):
    from imaging.io import read_image
    from imaging.sequences import on_first_grid

    flair = read_image(brats_multiseq / "imagesTr" / "brats_001_0000.nii.gz")
    t1c = read_image(brats_multiseq / "imagesTr" / "brats_001_0001.nii.gz")
    moved = _moved(t1c, 8.0, (6.0, -4.0, 3.0), 1.5)
    volumes, qa = on_first_grid([flair, moved], ["FLAIR", "T1c"])
    q = qa[0]
    assert q["method"].startswith("rigid") and not q["suspect"]
    assert abs(q["rotation_deg"] - 8.0) < 1.0 and abs(q["translation_mm"] - math.dist((0, 0, 0), (6, -4, 3))) < 1.5
    assert q["mutual_information_after"] > q["mutual_information_before"] + 0.05
    assert volumes[1].geometry == flair.geometry
    brain = t1c.array > t1c.array.min() + 0.1
    assert np.corrcoef(volumes[1].array[brain], t1c.array[brain])[0, 1] > 0.95


def test_a_sequence_of_another_region_is_refused_with_how_little_it_covers(phantom_dataset):
    from imaging.errors import GeometryMismatchError
    from imaging.io import read_image
    from imaging.sequences import on_first_grid

    first = read_image(phantom_dataset / "imagesTr" / "phantom_000.nii.gz")
    elsewhere = _moved(first, 0.0, (0.0, 0.0, 0.0), 1.0)
    elsewhere.geometry = type(elsewhere.geometry)(elsewhere.geometry.size, elsewhere.geometry.spacing,
                                                  (0.0, 0.0, 400.0), elsewhere.geometry.direction)
    with pytest.raises(GeometryMismatchError, match=r"sequence 1 \(T2, moved.nii.gz\): covers 0% of the first"):
        on_first_grid([first, elsewhere], ["T1", "T2"])


@pytest.mark.trains
def test_two_sequences_on_different_grids_train_refine_and_evaluate_through_the_cli(
        two_sequence_dataset, tmp_path, capsys):
    from worker.cli import main
    from worker.demo import QUICK_REFINEMENT, set_refinement

    data = two_sequence_dataset
    assert main(["train", "--dataset", str(data), "--out", str(tmp_path / "m"), "--holdout", "2", "--iterations",
                 "30", "--reg-iterations", "20", "--validation", "0", "--threads", "2"]) == 0
    set_refinement(tmp_path / "m", QUICK_REFINEMENT, data)  # ISL on a test's scale: refine and evaluate it 4 times
    t1, t2 = (data / "imagesTr" / f"phantom_000_000{c}.nii.gz" for c in (0, 1))
    assert main(["refine", str(t1), str(t2), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out"),
                 "--atlas-dir", str(data), "--threads", "2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (q,) = report["qa"]["sequences"]
    assert q["sequence"].startswith("sequence 1 (T2, ") and q["method"].startswith("rigid")
    # the phantoms are smooth blobs in noise, a weak hold for mutual information: the accuracy is the real-data test's
    assert {"mutual_information_before", "mutual_information_after", "rotation_deg", "translation_mm", "coverage",
            "suspect"} <= set(q) and q["mutual_information_after"] >= q["mutual_information_before"]
    assert report["seconds"]["read"] > 0 and (tmp_path / "out" / "mask.nii.gz").is_file()

    capsys.readouterr()
    assert main(["refine", str(t1), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "one"),
                 "--atlas-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "the model takes 2 sequence(s), one file, folder or zip each, in this order: T1, T2; 1 given" in err
    assert err.rstrip().endswith("missing T2") and not (tmp_path / "one").exists()

    assert main(["evaluate", "--dataset", str(data), "--model", str(tmp_path / "m"), "--json",
                 str(tmp_path / "ev.json"), "--cases", "2", "--threads", "2"]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    held_out = json.loads((tmp_path / "m" / "bundle.json").read_text())["holdout_cases"]
    assert [c["case"] for c in ev["cases"]] == held_out  # scored on the cases it never trained on
    dice = [c["dice_baseline"]["whole"] for c in ev["cases"]]
    # a network of 30 iterations (about 0.5 here), yet it finds the structure in both: one that finds nothing scores 0
    assert ev["summary"]["mean_dice_baseline"] == pytest.approx(np.mean(dice)) and min(dice) > 0.3, dice

    # one DICOM study holding both series: each assigned to its sequence by its description, or by option
    import SimpleITK as sitk
    from dicom_corpus import datasets, save
    from pydicom.uid import generate_uid

    study, frame = generate_uid(), generate_uid()
    uids = {}
    for path, description in ((t1, "scout"), (t2, "T2 SPACE sag")):
        series = datasets(sitk.ReadImage(str(path)), study_uid=study, frame_of_reference=frame)
        for ds in series:
            ds.SeriesDescription = description
        uids[description] = series[0].SeriesInstanceUID
        save(series, tmp_path / "study")
    capsys.readouterr()
    assert main(["refine", str(tmp_path / "study"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "no"),
                 "--atlas-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "no series whose description names sequence T1; name its series (--sequence-series T1=UID, or" in err
    assert f"{uids['scout']} (scout, 40 files)" in err
    assert main(["refine", str(tmp_path / "study"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "dcm"),
                 "--atlas-dir", str(data), "--sequence-series", f"T1={uids['scout']}", "--threads", "2"]) == 0
    (q,) = json.loads((tmp_path / "dcm" / "report.json").read_text())["qa"]["sequences"]
    assert q["sequence"].startswith("sequence 1 (T2, ") and q["method"].startswith("rigid")
    assert (tmp_path / "dcm" / "seg.dcm").is_file()  # a DICOM study gets its DICOM SEG, on the first series


@pytest.mark.trains
def test_a_model_of_two_sequences_retrains_on_corrections_kept_with_both(two_sequence_dataset, tmp_path):
    """A radiologist's correction of a two-sequence job is kept with both sequences on the first one's grid, as the
    service stores it (image.nii.gz, image_0001.nii.gz, label.nii.gz): retraining reads both, and a correction kept
    with one sequence only is refused, naming the model's sequences."""
    import shutil

    import torch

    from imaging.errors import DatasetError
    from imaging.io import write_image
    from imaging.sequences import read_sequences
    from isl.training.retrain import Correction, RetrainConfig, retrain
    from isl.training.train import BundleTrainConfig, train_bundle

    torch.set_num_threads(2)
    cfg = BundleTrainConfig(holdout=2, validation=0, name="two")
    cfg.training.iterations, cfg.registration.iterations = 20, 10
    train_bundle(two_sequence_dataset, tmp_path / "v0", cfg, torch.device("cpu"), progress=lambda m: None)
    corrections = []
    for i, case in enumerate(["phantom_000", "phantom_001"]):  # the held-out cases, as corrected jobs
        folder = tmp_path / "corrections" / case
        folder.mkdir(parents=True)
        volumes, _ = read_sequences([two_sequence_dataset / "imagesTr" / f"{case}_000{k}.nii.gz" for k in (0, 1)],
                                    None, ["T1", "T2"])
        for k, v in enumerate(volumes):
            write_image(v.array, v.geometry, folder / ("image.nii.gz" if k == 0 else f"image_{k:04d}.nii.gz"))
        shutil.copy(two_sequence_dataset / "labelsTr" / f"{case}.nii.gz", folder / "label.nii.gz")
        corrections.append(Correction.stored(f"job{i}", folder))
    assert [len(c.images) for c in corrections] == [2, 2]
    rcfg = RetrainConfig(iterations=20, reg_iterations=10, configure_minutes=0.01)
    out = retrain(tmp_path / "v0", two_sequence_dataset, corrections, tmp_path / "v1", rcfg, torch.device("cpu"),
                  progress=lambda m: None)
    assert sorted(out["data"]["corrections"]) == ["job0", "job1"]
    one = Correction(id="one", image=corrections[0].image, label=corrections[0].label)
    with pytest.raises(DatasetError, match=r"correction one: 1 sequence\(s\) kept with it; model .+ takes 2 \(T1, "):
        retrain(tmp_path / "v0", two_sequence_dataset, [one], tmp_path / "v2", rcfg, torch.device("cpu"),
                progress=lambda m: None)
