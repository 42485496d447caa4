"""Training a bundle is reproducible: the same data and seed give the same weights (the initial weights are
seeded too; torch's own seed differs in every process)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = """
import sys
from pathlib import Path
from worker.demo import train_tiny_bundle
from worker.method.bundle import ISLBundle
train_tiny_bundle(Path(sys.argv[1]), Path(sys.argv[2]))
print(ISLBundle.load(sys.argv[2]).version)
"""


def test_the_same_seed_trains_the_same_bundle_in_two_processes(phantom_dataset, tmp_path):
    versions = [subprocess.run([sys.executable, "-c", TRAIN, str(phantom_dataset), str(tmp_path / name)], cwd=ROOT,
                               capture_output=True, text=True, timeout=600, check=True).stdout.split()[-1]
                for name in ("a", "b")]
    assert versions[0].startswith("a-") and versions[1].startswith("b-")
    assert versions[0][2:] == versions[1][2:]  # the digest of both checkpoints


def test_the_promotion_rule_takes_no_worse_on_unseen_cases_and_judges_nothing_without_them():
    from worker.training.retrain import judge

    parent = {"a": 0.80, "b": 0.70}
    assert judge(parent, {"a": 0.81, "b": 0.69}, 0.0)["promoted"]  # mean 0.75 = 0.75: no worse
    worse = judge(parent, {"a": 0.78, "b": 0.70}, 0.0)
    assert worse["judged"] and not worse["promoted"] and "worse than the parent" in worse["reason"]
    assert judge(parent, {"a": 0.78, "b": 0.70}, 0.02)["promoted"]  # within the margin
    none = judge({}, {}, 0.0)
    assert not none["judged"] and not none["promoted"] and "stays a candidate" in none["reason"]


def test_the_judged_cases_are_the_validation_cases_or_those_no_version_trained_on(phantom_dataset):
    from segmentation.dataset import load_dataset
    from worker.training.retrain import judged_cases

    ds = load_dataset(phantom_dataset)
    ids = sorted(c.case_id for c in ds.cases)
    assert judged_cases(ds, {"validation_cases": ids[3:5], "train_cases": ids[2:]}, 10) == ids[3:5]
    meta = {"validation_cases": [], "holdout_cases": ids[:2], "train_cases": ids[2:5], "atlases": ids[2:6]}
    assert judged_cases(ds, meta, 10) == ids[6:] and judged_cases(ds, meta, 1) == ids[6:7]
