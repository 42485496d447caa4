"""The agreement report (service/agreement.py) on correction records made by the test: a batch whose corrections
enlarge every mask does not converge, and says why; a batch whose corrections barely touch the masks does; the
last correction of a job is the one that counts; too few cases give no verdict."""
import numpy as np

from jobstore.rows import Correction
from service.agreement import MIN_CASES, agreement, bland_altman_png


def _rows(version: str, auto: np.ndarray, corrected: np.ndarray, dice: np.ndarray, t0: float = 0.0,
          jobs: list[str] | None = None) -> list[Correction]:
    return [Correction(id=f"{version}-{t0 + i}", job_id=(jobs or [f"{version}-{i}" for i in range(len(auto))])[i],
                       tenant="alpha", model="pituitary", model_version=version, actor="key:test", created=t0 + i,
                       source="nifti", folder="", label_sha256="", summary={"per_label": {"gland": {
                           "refined_ml": float(a), "corrected_ml": float(c), "dice_refined_vs_corrected": float(d),
                           "hausdorff_mm": 4.0 * (1 - d), "average_hausdorff_mm": 1.0 - d}}, "voxels_changed": 1})
            for i, (a, c, d) in enumerate(zip(auto, corrected, dice))]


def test_a_batch_whose_corrections_change_volumes_does_not_converge_and_one_that_agrees_does():
    rng = np.random.default_rng(0)
    auto = rng.uniform(0.5, 1.5, 12)
    first = _rows("v1", auto, auto * 1.10 + rng.normal(0, 0.01, 12), np.full(12, 0.90))
    second = _rows("v2", auto, auto * (1 + rng.normal(0, 0.004, 12)), np.full(12, 0.97), t0=100)
    report = agreement(first + second)
    v1, v2 = report["batches"]
    assert (v1["model_version"], v2["model_version"]) == ("v1", "v2") and v1["cases"] == v2["cases"] == 12
    g1, g2 = v1["structures"]["gland"], v2["structures"]["gland"]
    assert g1["volumes_differ"] and g1["t_test_p"] < 1e-4 and g1["wilcoxon_p"] < 0.01
    assert g1["mean_difference_ml"] < 0 and g1["limits_of_agreement_ml"][0] < g1["mean_difference_ml"]
    assert v1["converged"] is False and "gland: volumes differ" in v1["why"] and "Dice 0.9 < 0.94" in v1["why"]
    assert not g2["volumes_differ"] and g2["spearman_rho"] > 0.97 and g2["mean_dice"] == 0.97
    assert v2["converged"] is True
    assert g2["mean_hausdorff_mm"] == 0.12 and g2["mean_average_hausdorff_mm"] == 0.03
    strict = agreement(second, dice_min=0.98)["batches"][0]
    assert strict["converged"] is False and "Dice 0.97 < 0.98" in strict["why"]


def test_the_last_correction_of_a_job_counts_and_few_cases_give_no_verdict():
    auto = np.array([1.0, 2.0, 3.0, 4.0])
    rows = _rows("v1", auto, auto, np.ones(4), jobs=["a", "b", "c", "d"])
    rows += _rows("v1", auto[:1], auto[:1] * 2, np.full(1, 0.5), t0=10, jobs=["a"])  # job a corrected again
    batch = agreement(rows)["batches"][0]
    assert batch["cases"] == 4 and batch["structures"]["gland"]["mean_corrected_ml"] == (2 + 2 + 3 + 4) / 4
    few = agreement(rows[: MIN_CASES - 1])["batches"][0]
    assert few["converged"] is None and f"at least {MIN_CASES}" in few["why"]
    assert few["structures"]["gland"]["t_test_p"] is None
    png = bland_altman_png(rows, "pituitary")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_batches_split_by_a_metadata_key():
    auto = np.arange(1.0, 9.0)
    rows = _rows("v1", auto, auto, np.ones(8))
    for i, row in enumerate(rows):
        if i < 5:
            row.summary["metadata"] = {"age_band": "child" if i % 2 else "adult"}
    report = agreement(rows, group_by="age_band")
    groups = {b["group"]["age_band"]: b["cases"] for b in report["batches"]}
    assert report["group_by"] == "age_band" and groups == {"adult": 3, "child": 2, "(none)": 3}
    assert all(b["model_version"] == "v1" for b in report["batches"])
