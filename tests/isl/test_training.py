"""Training a bundle is reproducible: the same data and seed give the same weights (the initial weights are
seeded too; torch's own seed differs in every process)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = """
import sys
from pathlib import Path
from worker.demo import train_tiny_bundle
from isl.bundle import ISLBundle
train_tiny_bundle(Path(sys.argv[1]), Path(sys.argv[2]))
print(ISLBundle.load(sys.argv[2]).version)
"""


@pytest.mark.subprocess
def test_the_same_seed_trains_the_same_bundle_in_two_processes(phantom_dataset, tmp_path):
    versions = [subprocess.run([sys.executable, "-c", TRAIN, str(phantom_dataset), str(tmp_path / name)], cwd=ROOT,
                               capture_output=True, text=True, timeout=600, check=True).stdout.split()[-1]
                for name in ("a", "b")]
    assert versions[0].startswith("a-") and versions[1].startswith("b-")
    assert versions[0][2:] == versions[1][2:]  # the digest of both checkpoints


def test_the_promotion_rule_takes_no_worse_on_unseen_cases_and_judges_nothing_without_them():
    from isl.training.retrain import judge

    parent = {"a": 0.80, "b": 0.70}
    assert judge(parent, {"a": 0.81, "b": 0.69}, 0.0)["promoted"]  # mean 0.75 = 0.75: no worse
    worse = judge(parent, {"a": 0.78, "b": 0.70}, 0.0)
    assert worse["judged"] and not worse["promoted"] and "worse than the parent" in worse["reason"]
    assert judge(parent, {"a": 0.78, "b": 0.70}, 0.02)["promoted"]  # within the margin
    none = judge({}, {}, 0.0)
    assert not none["judged"] and not none["promoted"] and "stays a candidate" in none["reason"]


def test_the_judged_cases_are_the_validation_cases_or_those_no_version_trained_on(phantom_dataset):
    from imaging.dataset import load_dataset
    from isl.meta import BundleMeta
    from isl.training.retrain import judged_cases

    ds = load_dataset(phantom_dataset)
    ids = sorted(c.case_id for c in ds.cases)
    assert judged_cases(ds, BundleMeta(version="v", validation_cases=ids[3:5], train_cases=ids[2:]), 10) == ids[3:5]
    meta = BundleMeta(version="v", validation_cases=[], holdout_cases=ids[:2], train_cases=ids[2:5], atlases=ids[2:6])
    assert judged_cases(ds, meta, 10) == ids[6:] and judged_cases(ds, meta, 1) == ids[6:7]


def test_corrections_are_held_back_only_where_the_cases_reach_ten_and_only_those_the_parent_did_not_train_on():
    from isl.meta import BundleMeta
    from isl.training.retrain import Correction, held_back

    def corrections(n):
        return [Correction(id=f"c{i}", image=Path(f"c{i}.nii.gz"), label=Path(f"l{i}.nii.gz")) for i in range(n)]

    def parent(trained_corrections=0):
        return BundleMeta(version="v", train_cases=["a", "b", "c"],
                          corrections=[f"c{i}" for i in range(trained_corrections)])

    three = parent()
    assert held_back(corrections(6), three, 0) == []  # 9 cases: none set aside, as `isl train` decides
    held = held_back(corrections(12), parent(6), 0)
    assert len(held) == 3 and all(int(c.id[1:]) >= 6 for c in held)  # 15 cases: a fifth, from the new ones
    assert held == held_back(corrections(12), parent(6), 0)  # seeded
    assert len(held_back(corrections(12), parent(11), 0)) == 0  # 1 new
    assert len(held_back(corrections(60), three, 0)) == 10  # at most 10


@pytest.mark.trains
def test_a_model_of_too_few_cases_returns_the_network_and_its_retraining_is_judged_on_held_back_corrections(
        tmp_path):
    """The first rule with nothing to decide from: a bundle trained on 6 cases cannot set validation cases aside,
    so refinement returns the network's own mask and says why (ISL's defaults, tuned on one dataset, may hurt on
    another). Its retraining with 6 corrections (12 cases) holds 3 of them back, configures on them and is judged
    on them: the tenant's own data decides."""
    import numpy as np
    import torch

    from imaging.dataset import load_dataset
    from isl.bundle import ISLBundle
    from isl.refiner import Refiner
    from isl.training.retrain import Correction, RetrainConfig, retrain
    from isl.training.train import BundleTrainConfig, train_bundle
    from worker.demo import make_dataset

    torch.set_num_threads(2)
    make_dataset(tmp_path / "base", n_train=6, n_test=0, seed=3)
    cfg = BundleTrainConfig(name="few")
    cfg.training.iterations, cfg.registration.iterations = 30, 20
    bundle = train_bundle(tmp_path / "base", tmp_path / "v0", cfg, torch.device("cpu"), progress=lambda m: None)
    decision = bundle.meta["refinement"]["decision"]
    assert decision["method"] == "baseline" and "6 training cases, too few" in decision["reason"]
    assert "Not configured: 6 training cases" in (tmp_path / "v0" / "MODEL_CARD.md").read_text()
    ds = load_dataset(tmp_path / "base")
    refiner = Refiner(bundle, bundle.load_atlases(ds.root), bundle.refinement_config(), torch.device("cpu"))
    from imaging.dataset import load_case

    x, _ = refiner.pre.images(load_case(ds, ds.cases[0])[0])
    res = refiner.refine(x)
    assert res.qa["method"] == "baseline" and res.qa["configuration"] == decision
    assert np.array_equal(res.probs.argmax(0), res.baseline.argmax(0))

    make_dataset(tmp_path / "new", n_train=6, n_test=0, seed=4)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (tmp_path / "new" / "labelsTr").glob("*.nii.gz"))
    corrections = [Correction(id=f"job{i}", image=tmp_path / "new" / "imagesTr" / f"{c}.nii.gz",
                              label=tmp_path / "new" / "labelsTr" / f"{c}.nii.gz") for i, c in enumerate(ids)]
    out = retrain(tmp_path / "v0", tmp_path / "base", corrections, tmp_path / "v1",
                  RetrainConfig(iterations=30, reg_iterations=20, configure_minutes=0.01), torch.device("cpu"),
                  progress=lambda m: None)
    held = out["data"]["held_back_corrections"]
    assert len(held) == 3 and sorted(held + out["data"]["corrections"]) == sorted(c.id for c in corrections)
    assert out["figures"]["judged_cases"] == held and out["outcome"]["judged"] and out["outcome"]["cases"] == 3
    child = ISLBundle.load(tmp_path / "v1")
    assert child.meta["held_back_corrections"] == held and child.meta["corrections"] == out["data"]["corrections"]
    assert f"held back from training, to configure and judge this version on: {', '.join(held)}" in (
        tmp_path / "v1" / "MODEL_CARD.md").read_text()
    record = child.meta["refinement"]
    assert record["validation_cases"] and set(record["validation_cases"]) <= set(held)  # configured on them
    assert record["decision"]["method"] in ("isl", "baseline", "tta_flip") and record["decision"]["reason"]


def test_a_bundle_keeps_its_loss_curves_for_the_console(tiny_bundle):
    import json

    from isl.training.train import curve_points

    training = json.loads((tiny_bundle / "bundle.json").read_text())["training"]
    seg, reg = training["curves"]["segmentation"], training["curves"]["registration"]
    assert [len(seg), seg[-1][0]] == [30, 30] and [len(reg), reg[-1][0]] == [20, 20]  # one point per iteration here
    assert all(isinstance(loss, float) for _, loss in seg + reg)
    long = curve_points(list(range(1000)), points=50)  # windows of 20 iterations, each its mean
    assert len(long) == 50 and long[0] == [20, 9.5] and long[-1] == [1000, 989.5]
    assert curve_points([]) == [] and curve_points([2.0]) == [[1, 2.0]]
