"""Partial labels (structures not contoured in some cases), the per-case safety of the final mix, and the
self-configuration of refinement: unit checks of each rule, then one bundle end to end on phantoms."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imaging.dataset import load_case, load_dataset
from imaging.errors import DatasetError, InputError


def _drop_label(dataset, case_id: str, value: int) -> None:
    path = dataset / "labelsTr" / f"{case_id}.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[array == value] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


@pytest.fixture(scope="module")
def partial_dataset(tmp_path_factory):
    """14 phantoms (2 held out); the tail of two training cases is not contoured, as cases.json says."""
    from worker.demo import make_dataset

    root = tmp_path_factory.mktemp("partial")
    make_dataset(root, n_train=12, n_test=2, seed=3)
    for case_id in ("phantom_001", "phantom_005"):
        _drop_label(root, case_id, 2)
    (root / "cases.json").write_text(json.dumps([{"case": "phantom_001", "structures_present": ["head"]},
                                                 {"case": "phantom_005", "structures_present": ["head"]}]))
    return root


def test_cases_json_marks_what_each_case_contours(partial_dataset):
    ds = load_dataset(partial_dataset)
    assert ds.case("phantom_005").present(ds.labels).tolist() == [True, True, False]
    assert ds.case("phantom_006").present(ds.labels).tolist() == [True, True, True]  # not listed: all


def test_cases_json_contradicting_the_label_map_or_the_labels_is_refused(partial_dataset, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(partial_dataset, copy)
    (copy / "cases.json").write_text(json.dumps([{"case": "phantom_006", "structures_present": ["head"]}]))
    ds = load_dataset(copy)
    with pytest.raises(DatasetError, match="does not contour"):
        load_case(ds, ds.case("phantom_006"))
    (copy / "cases.json").write_text(json.dumps([{"case": "phantom_006", "structures_present": ["hed"]}]))
    with pytest.raises(DatasetError, match="hed"):
        load_dataset(copy)


def test_marginal_loss_is_dice_ce_when_everything_is_contoured_and_ignores_what_is_not():
    from monai.losses import DiceCELoss

    from segmentation.losses import _marginal, marginal_dice_ce

    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 6, 6, 6), torch.randint(0, 3, (2, 1, 6, 6, 6))
    all_known = torch.ones(2, 3, dtype=torch.bool)
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(_marginal(logits, target, all_known, 1e-5), monai, atol=1e-5)
    # a case without label 2: its map says background where the network says 2. Not penalised when unknown.
    target = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    target[..., :2, :, :] = 1
    logits = torch.full((1, 3, 6, 6, 6), -5.0)
    logits[:, 1, :2] = 5.0
    logits[:, 2, 2:4] = 5.0  # the uncontoured structure, found
    logits[:, 0, 4:] = 5.0
    known = torch.tensor([[True, True, False]])
    assert marginal_dice_ce(logits, target, known) < 0.5 * marginal_dice_ce(logits, target, torch.ones_like(known))


def test_atlases_that_lack_a_label_do_not_vote_on_it():
    from isl.align import majority_vote
    from registration.fusion import fuse_labels

    labels = torch.zeros(3, 3, 4, 4, 4)
    labels[:, 0] = 1.0
    labels[0, 2, :2], labels[0, 0, :2] = 1.0, 0.0  # atlas 0 contours label 2 in the first half
    labels[1, 2, :2], labels[1, 0, :2] = 1.0, 0.0  # so does atlas 1
    known = torch.ones(3, 3, dtype=torch.bool)
    known[2, 2] = False  # atlas 2 never contoured label 2: its background there says nothing
    images, scan = torch.rand(3, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4)
    fused = fuse_labels(images, labels, scan, beta=0.0, window=3, known=known)
    assert torch.allclose(fused[2, :2], torch.ones(2, 4, 4)) and torch.allclose(fused.sum(0), torch.ones(4, 4, 4))
    assert torch.allclose(fuse_labels(images, labels, scan, beta=0.0, window=3)[2, :2], torch.full((2, 4, 4), 2 / 3))
    labels = torch.cat([labels, labels[2:]])  # a fourth atlas without label 2
    known = torch.cat([known, known[2:]])
    assert majority_vote(labels, known)[2, :2].all()  # both atlases that contour label 2 say it
    assert not majority_vote(labels)[2, :2].any()  # counting the other two as background: a tie, to background


def test_safety_keeps_the_starting_mask_for_a_label_whose_fusion_disagrees():
    from isl.mask import safe_mix

    start = np.zeros((3, 8, 8, 8), np.float32)
    start[0] = 1.0
    start[1, :4], start[0, :4] = 1.0, 0.0  # label 1 in the first half
    start[2, 6:], start[0, 6:] = 1.0, 0.0  # label 2 in the last slices
    fused = start.copy()
    fused[1], fused[0] = 0.0, 1.0 - fused[2]
    fused[1, 4:6], fused[0, 4:6] = 1.0, 0.0  # the atlases put label 1 somewhere else entirely
    mixed, qa = safe_mix(start, start.copy(), fused, 0.8, 0.5)
    assert qa["weights"]["fusion"] == [0.0, 0.8] and qa["fusion_vs_start_dice"][0] == 0.0
    assert (mixed.argmax(0) == start.argmax(0)).all()
    unsafe, _ = safe_mix(start, start.copy(), fused, 0.8, 0.0)
    assert (unsafe.argmax(0)[4:6] == 1).all() and (unsafe.argmax(0)[:4] == 0).all()


def _setting(w, tau=0.5):
    from isl.training.configure import Setting

    return Setting(True, 8, 20, True, 30.0, 1, w, tau)


def _case(baseline, tta, settings: dict) -> dict:
    """One validation case's scores, one label (1), with the ablation settings the table needs."""
    settings = {_setting(1.0): 0.5, _setting(0.0): 0.5} | settings
    one = {s: {1: v} for s, v in settings.items()}
    one |= {_setting(s.fusion_weight, 0.0): {1: v} for s, v in settings.items()}
    return {"baseline": {1: baseline}, "tta_flip": {1: tta}} | one


def test_decide_keeps_a_setting_that_worsens_too_many_cases_out():
    from isl.training.configure import decide

    risky, safe = _setting(0.8), _setting(0.2)
    per_case = [_case(0.70, 0.71, {risky: s_r, safe: s_s})
                for s_r, s_s in ((0.95, 0.72), (0.95, 0.72), (0.60, 0.71), (0.60, 0.72), (0.95, 0.72))]
    method, best, table, reason = decide(per_case)
    assert method == "isl" and best.setting == safe  # the risky one is better on average but worsens 2 of 5 (> 1)
    assert table[0]["candidate"] == "baseline" and "worsening 0" in reason
    assert table[3]["candidate"].startswith("isl, this rule judged on each case left out")
    per_case = [_case(0.70, 0.71, {risky: 0.705, safe: 0.705}) for _ in range(5)]
    method, _, _, reason = decide(per_case)
    assert method == "tta_flip" and "refinement returns tta_flip" in reason


def test_decide_refines_only_the_labels_a_setting_helps():
    """A setting that lifts one organ and hurts another is used for the first only; the other stays as the
    network has it, and the figure on the validation cases is what that composite scores."""
    from isl.training.configure import decide

    s = _setting(0.5)
    per_case = []
    for lift, hurt in ((0.10, -0.05), (0.08, -0.04), (0.12, -0.06), (0.09, -0.02), (0.11, -0.05)):
        case = _case(0.6, 0.6, {s: 0.0})
        case["baseline"] = case["tta_flip"] = {1: 0.6, 2: 0.8}
        for k in [k for k in case if k not in ("baseline", "tta_flip")]:
            case[k] = {1: 0.6 + lift, 2: 0.8 + hurt} if k.fusion_weight == 0.5 else {1: 0.5, 2: 0.5}
        per_case.append(case)
    method, best, table, reason = decide(per_case, {1: "liver", 2: "gallbladder"})
    assert method == "isl" and best.keep == frozenset({2}) and "gallbladder" in reason
    assert table[2]["mean_dice"] == pytest.approx((0.6 + 0.1 + 0.8) / 2, abs=1e-4)
    assert table[2]["labels_left_to_the_network"] == "gallbladder"


def test_decide_gives_each_label_the_fusion_weight_that_serves_it():
    """Where the atlases are right for one organ and the network for another, each gets its own weight."""
    from isl.training.configure import decide

    per_case = []
    for i in range(5):
        case = {"baseline": {1: 0.6, 2: 0.6}, "tta_flip": {1: 0.6, 2: 0.6}}
        for w in (0.0, 0.5, 1.0):
            for tau in (0.0, 0.5):
                case[_setting(w, tau)] = {1: 0.6 + 0.1 * w + 0.01 * i, 2: 0.7 - 0.1 * w}
        per_case.append(case)
    method, best, table, reason = decide(per_case, {1: "mandible", 2: "parotid"})
    assert method == "isl" and dict(best.weights) == {1: 1.0, 2: 0.0} and not best.keep
    assert best.mean == pytest.approx(np.mean([(0.7 + 0.01 * i + 0.7) / 2 for i in range(5)]))
    assert "mandible 1.0" in reason and "parotid 0.0" in reason


def test_decide_does_not_trust_a_choice_that_only_its_own_cases_support():
    """Five settings, each lucky on one validation case: in-sample the best beats the network, but re-made with
    each case left out it never picks the setting that was lucky on that case, so it gains nothing: refused."""
    from isl.training.configure import decide

    lucky = [_setting(w) for w in (0.1, 0.2, 0.3, 0.4, 0.6)]
    per_case = [_case(0.7, 0.7, {s: 0.8 if i == j else 0.7 for j, s in enumerate(lucky)}) for i in range(5)]
    method, best, table, reason = decide(per_case)
    assert best.mean == pytest.approx(0.72) and table[3]["mean_dice"] == pytest.approx(0.7)
    assert method == "baseline" and "left out" in reason


class _Fusions:
    """A validation case whose warped atlases' fusion scores `by_kind[kind]` under each global stage."""

    def __init__(self, by_kind: dict[str, float]):
        self.by_kind, self.asked = by_kind, []

    def fusions(self, mask_flips, k, cfgs):
        self.asked += [(mask_flips, k, cfg.affine.kind) for cfg in cfgs]
        return [self.by_kind[cfg.affine.kind] for cfg in cfgs]


@pytest.mark.fast
@pytest.mark.parametrize("affine, chosen", [(0.7, "affine"), (0.6, "none"), (0.5, "none")])
def test_a_global_stage_is_kept_only_where_its_atlases_fuse_better(affine, chosen):
    from isl.config import ISLConfig
    from isl.training.configure import choose_global_stage

    cases = [_Fusions({"none": 0.6, "affine": affine}), _Fusions({"none": 0.6, "affine": affine})]
    cfg, record = choose_global_stage(cases, True, 8, ISLConfig(), progress=lambda m: None)
    assert cfg.affine.kind == record["kind"] == chosen
    assert record["fusion_mean_dice"] == {"none": 0.6, "affine": affine} and record["cases"] == 2
    assert cases[0].asked == [(True, 8, "none"), (True, 8, "affine")]


def test_safe_mix_leaves_a_kept_label_exactly_as_the_start_has_it():
    from isl.mask import safe_mix

    rng = np.random.default_rng(0)
    start, net, fused = (rng.dirichlet(np.ones(3), size=(6, 6, 6)).transpose(3, 0, 1, 2).astype(np.float32)
                         for _ in range(3))
    keep = np.array([False, False, True])
    mixed, qa = safe_mix(start, net, fused, 0.5, 0.0, keep=keep)
    assert ((mixed.argmax(0) == 2) == (start.argmax(0) == 2)).all()
    assert ((mixed.argmax(0) == 1) != (start.argmax(0) == 1)).any()  # the other label is refined
    assert qa["weights"]["start"] == [0.0, 1.0]


def test_safe_mix_with_a_weight_per_label_draws_each_label_as_its_own_mix():
    from isl.mask import safe_mix

    rng = np.random.default_rng(1)
    start, net, fused = (rng.dirichlet(np.ones(3), size=(8, 8, 8)).transpose(3, 0, 1, 2).astype(np.float32)
                         for _ in range(3))
    mixed, qa = safe_mix(start, net, fused, np.array([0.5, 1.0, 0.0]), 0.0)
    as_fused, as_net, out = fused.argmax(0) == 1, net.argmax(0) == 2, mixed.argmax(0)
    assert ((out == 1) == (as_fused & ~(as_net & (net[2] > fused[1])))).all()  # label 1: where the fusion says it
    assert ((out == 2) == (as_net & ~(as_fused & (fused[1] >= net[2])))).all()  # label 2: where the network does
    assert ((out == 0) == ~(as_fused | as_net)).all()  # the rest is background
    assert qa["weights"]["fusion"] == [1.0, 0.0]
    np.testing.assert_allclose(mixed.sum(0), 1.0, atol=1e-5)


@pytest.mark.trains
def test_train_configures_refinement_and_the_bundle_uses_it(partial_dataset, tmp_path):
    """End to end: training with partial labels sets validation cases aside, searches, writes the choice into the
    bundle and its card; refinement then uses it unless overridden; evaluation skips labels not contoured."""
    from isl.evaluation.evaluate import evaluate
    from isl.refiner import load_refiner
    from isl.training.train import BundleTrainConfig, train_bundle

    cfg = BundleTrainConfig(holdout=2, validation=3, name="configured")
    cfg.training.iterations, cfg.registration.iterations = 40, 20
    bundle = train_bundle(partial_dataset, tmp_path / "m", cfg, torch.device("cpu"), progress=lambda m: None)
    record = bundle.meta["refinement"]
    assert len(record["validation_cases"]) == 3 and set(record["validation_cases"]).isdisjoint(bundle.meta["atlases"])
    assert record["config"]["method"] == record["decision"]["method"] and record["decision"]["reason"]
    assert [r["candidate"] for r in record["table"][:2]] == ["baseline", "tta_flip"]
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert "## Refinement configuration" in card and record["decision"]["reason"] in card
    refiner = load_refiner(tmp_path / "m", partial_dataset, {"device": "cpu"})
    assert refiner.cfg.fusion_weight == record["config"]["fusion_weight"]
    assert refiner.cfg.min_agreement == record["config"]["min_agreement"]
    assert refiner.cfg.keep_start == record["config"]["keep_start"] and "per_label" in record
    assert load_refiner(tmp_path / "m", partial_dataset, {"device": "cpu", "atlases": 3}).cfg.atlases == 3
    # the decision re-made from the scores the search left beside the bundle is the same decision
    from isl.training.train import reconfigure

    again = reconfigure(tmp_path / "m", partial_dataset, 3, 60.0, torch.device("cpu"), lambda m: None,
                        from_scores=True, command="isl configure --model m --from-scores")
    assert ", then `isl configure --model m --from-scores`" in (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert again["config"] == record["config"] and again["table"] == record["table"]
    # the global stage was decided on the same cases, and the bundle runs what was decided
    stage = record["global_alignment"]
    assert set(stage["fusion_mean_dice"]) == {"none", "affine"} and stage["cases"] == 3
    assert record["config"].get("affine", {}).get("kind", "none") == stage["kind"] == refiner.cfg.affine.kind
    assert again["global_alignment"] == stage and f"Global stage before the registration: **{stage['kind']}**" in card
    with pytest.raises(InputError, match="does not segment"):
        load_refiner(tmp_path / "m", partial_dataset, {"device": "cpu", "keep_start": ["spleen"]})
    assert not refiner.aligner.known[refiner.aligner.ids.index("phantom_005"), 2]
    # a held-out case whose tail is not contoured is scored on the head only
    _drop_label(partial_dataset, "phantom_000", 2)
    (partial_dataset / "cases.json").write_text(json.dumps(
        json.loads((partial_dataset / "cases.json").read_text()) + [{"case": "phantom_000",
                                                                      "structures_present": ["head"]}]))
    result = evaluate(partial_dataset, tmp_path / "m", tmp_path / "e.json", cases=1, cfg={"device": "cpu"},
                      progress=lambda m: None)
    assert set(result["cases"][0]["dice_isl"]) == {"head"}
    assert result["summary"]["configuration"]["method"] == record["decision"]["method"]


def test_mirroring_is_left_out_along_axes_where_labels_are_lateralised():
    from isl.training.plan import mirror_axes
    from segmentation.infer import flip_sets

    labels = []
    for shift in range(3):
        lab = np.zeros((16, 16, 24), np.uint8)
        lab[6:10, 6:10, 2 + shift:8 + shift] = 1  # "right" organ, always on the low-x side
        lab[6:10, 6:10, 16 - shift:22 - shift] = 2  # its partner, always on the high-x side
        lab[4:12, 6:10, 10:14] = 3  # a midline organ
        labels.append(lab)
    assert mirror_axes(labels, 4) == (0, 1)  # not along x: a mirrored case would swap right and left
    assert mirror_axes([(lab > 0).astype(np.uint8) for lab in labels], 2) == (0, 1, 2)  # one label: any axis
    assert len(flip_sets(True)) == 8 and flip_sets(()) == [()] and flip_sets((0, 2)) == [(), (2,), (4,), (2, 4)]


def test_evaluation_of_a_bundle_that_returns_a_peer_still_reports_isl_and_its_parts(tiny_bundle, phantom_dataset,
                                                                                   tmp_path):
    from isl.evaluation.evaluate import evaluate

    result = evaluate(phantom_dataset, tiny_bundle, tmp_path / "e.json", cases=1, progress=lambda m: None,
                      cfg={"device": "cpu", "atlases": 3, "method": "baseline"})
    (case,) = result["cases"]
    assert case["dice_isl"] == case["dice_baseline"] and case["qa"]["method"] == "baseline"
    assert case["qa"]["atlases_used"] and "folding_fraction" in case["qa"] and case["seconds_isl_full_run"] > 0
    assert result["summary"]["median_folding_fraction"] == case["qa"]["folding_fraction"] < 0.05  # the one case's
