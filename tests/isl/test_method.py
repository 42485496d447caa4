"""The moving average of predictions, the stopping rule, the ROI helpers and the refiner on phantoms."""
import numpy as np
import pytest

from imaging.metrics import mean_dice
from isl.mask import EMAMask
from segmentation.preprocess import centroid, crop, paste


def _onehot(labels, n=3):
    return np.eye(n, dtype=np.float32)[labels].transpose(3, 0, 1, 2)


def test_ema_is_the_exponential_moving_average():
    a = np.full((3, 2, 2, 2), 1 / 3, np.float32)
    b = _onehot(np.ones((2, 2, 2), int))
    ema = EMAMask(a, decay=0.75, tolerance=0.0, patience=1)
    ema.update(b)
    np.testing.assert_allclose(ema.probs, 0.75 * a + 0.25 * b, rtol=1e-6)
    ema.update(b)
    np.testing.assert_allclose(ema.probs, 0.75 * (0.75 * a + 0.25 * b) + 0.25 * b, rtol=1e-6)


def test_stopping_rule_waits_for_patience_calm_updates():
    labels = np.zeros((8, 8, 8), int)
    labels[2:6, 2:6, 2:6] = 1
    ema = EMAMask(_onehot(np.zeros_like(labels)), decay=0.25, tolerance=0.01, patience=2)
    fired = [ema.update(_onehot(labels)) for _ in range(4)]
    # first update flips the mask (big change), then it stays: calm, calm -> stop on the third
    assert fired == [False, False, True, True]
    assert ema.changes[0] > 0.5 and ema.changes[1] == 0.0


def test_stopping_rule_never_fires_while_the_mask_keeps_changing():
    rng = np.random.default_rng(0)
    ema = EMAMask(_onehot(rng.integers(0, 3, (6, 6, 6))), decay=0.0, tolerance=0.01, patience=1)
    assert not any(ema.update(_onehot(rng.integers(0, 3, (6, 6, 6)))) for _ in range(5))


def test_mean_dice_over_the_labels_present():
    a = np.zeros((4, 4, 4), int)
    a[:2] = 1
    assert mean_dice(a, a) == 1.0
    assert mean_dice(a, np.zeros_like(a)) == 0.0
    assert mean_dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_crop_and_paste_round_trip_at_the_border():
    a = np.arange(10 * 12 * 8, dtype=np.float32).reshape(10, 12, 8)
    box = crop(a, (1, 11, 7), (6, 6, 6))
    assert box.shape == (6, 6, 6) and box[0, 0, 0] == 0  # padded outside
    b = paste(np.zeros_like(a), box, (1, 11, 7))
    inside = b != 0
    np.testing.assert_array_equal(b[inside], a[inside])
    assert centroid(np.zeros((4, 4, 4), bool)) == (2, 2, 2)


def test_refiner_runs_and_reports(tiny_bundle, phantom_dataset):
    from imaging.dataset import load_case, load_dataset
    from isl.config import ISLConfig
    from isl.refiner import load_refiner

    cfg = ISLConfig(device="cpu", atlases=3, finetune_steps=10, min_steps=5)
    refiner = load_refiner(tiny_bundle, phantom_dataset, cfg)
    ds = load_dataset(phantom_dataset)
    vols, _, _ = load_case(ds, ds.case("phantom_000"))
    x, _ = refiner.pre.images(vols)
    res = refiner.refine(x)
    assert res.probs.shape == res.baseline.shape == (3,) + x.shape[1:]
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-4)
    assert len(res.qa["atlases_used"]) == 3 and 0.0 <= res.qa["folding_fraction"] < 0.05
    assert set(res.seconds) >= {"baseline", "registration", "finetune", "final"}
    assert res.qa["finetune_steps"] <= 10 and len(res.qa["ema_changes"]) >= 1
    assert "global_alignment" not in res.qa  # no global stage configured


def test_the_report_describes_each_atlas_s_global_transform(tiny_bundle, phantom_dataset):
    from imaging.dataset import load_case, load_dataset
    from isl.config import ISLConfig
    from isl.refiner import load_refiner

    cfg = ISLConfig(device="cpu", atlases=3, finetune_steps=5, min_steps=5, affine={"kind": "similarity"})
    refiner = load_refiner(tiny_bundle, phantom_dataset, cfg)
    ds = load_dataset(phantom_dataset)
    vols, _, _ = load_case(ds, ds.case("phantom_000"))
    report = refiner.refine(refiner.pre.images(vols)[0]).qa
    qa = report["global_alignment"]
    assert qa["kind"] == "similarity" and list(qa["atlases"]) == refiner.aligner.ids
    kept = [a for a, d in qa["atlases"].items() if d["plausible"]]
    # the phantoms' barely trained network over-segments: fitted to its mask, atlases may all be blown up beyond
    # max_scale, and then all go on as cropped
    assert qa["applied"] == bool(kept)
    assert qa["left_out_as_implausible"] == ([a for a in refiner.aligner.ids if a not in kept] if kept else [])
    kept = kept or refiner.aligner.ids
    for d in qa["atlases"].values():
        assert len(d["scale"]) == 3 and 0 <= d["rotation_deg"] <= 180 and len(d["translation_mm"]) == 3
    assert set(report["atlases_used"]) <= set(kept)


def test_the_untuned_network_in_the_roi_is_exactly_the_starting_mask(tiny_bundle, phantom_dataset):
    """The tuned network's ROI prediction is inferred as the baseline is (sliding windows over the whole scan):
    with no fine-tuning and no fusion, ISL returns the starting mask itself, not a context-starved variant."""
    from imaging.dataset import load_case, load_dataset
    from isl.config import ISLConfig
    from isl.refiner import load_refiner

    cfg = ISLConfig(device="cpu", atlases=2, finetune_steps=0, min_steps=0, fusion_weight=0.0, min_agreement=0.0,
                    mask_flips=True, final_flips=True)
    refiner = load_refiner(tiny_bundle, phantom_dataset, cfg)
    ds = load_dataset(phantom_dataset)
    vols, _, _ = load_case(ds, ds.case("phantom_001"))
    res = refiner.refine(refiner.pre.images(vols)[0])
    np.testing.assert_allclose(res.probs, res.start, atol=1e-6)


def test_final_inference_roi_is_one_pass_over_the_region_of_interest(tiny_bundle, phantom_dataset):
    """`final_inference="roi"`: the tuned network's final prediction is one (flip-averaged) pass over the ROI crop it
    was fine-tuned on, and that is what the final mix is made of."""
    import torch

    from imaging.dataset import load_case, load_dataset
    from isl.config import ISLConfig
    from isl.mask import initial_mask
    from isl.refiner import load_refiner
    from segmentation.infer import predict_probs

    cfg = ISLConfig(device="cpu", atlases=2, finetune_steps=0, min_steps=0, fusion_weight=0.0, min_agreement=0.0,
                    final_inference="roi")
    refiner = load_refiner(tiny_bundle, phantom_dataset, cfg)
    ds = load_dataset(phantom_dataset)
    vols, _, _ = load_case(ds, ds.case("phantom_001"))
    image = refiner.pre.images(vols)[0]
    res = refiner.refine(image)
    start = initial_mask(refiner.net, image, refiner.pre, True, torch.device("cpu"))
    expected = predict_probs(refiner.net, start.image, start.mask.shape[1:], flips=start.mirror_axes)[0].numpy()
    np.testing.assert_allclose(res.parts["network"], expected, atol=1e-5)
    np.testing.assert_allclose(res.probs, paste(res.start.copy(), expected, res.center), atol=1e-5)
    with pytest.raises(Exception, match="final_inference"):
        ISLConfig(final_inference="crop")


def test_the_config_validates_on_assignment_too():
    from pydantic import ValidationError

    from isl.config import ISLConfig

    cfg = ISLConfig()
    with pytest.raises(ValidationError, match="atlases"):
        cfg.atlases = 0
    with pytest.raises(ValidationError, match="steps"):
        cfg.registration.steps = -1
    with pytest.raises(ValidationError, match="no_such_knob"):
        ISLConfig(no_such_knob=1)
    assert cfg.atlases == 14 and cfg.registration.steps == 30


@pytest.mark.parametrize("which", ["decoder", "norm"])
def test_finetuning_moves_only_the_parameters_it_is_told_to(which):
    """`finetune_params`: with the encoder frozen, a step leaves the contracting path exactly as it was and moves
    the expanding path; with `norm`, only the normalisation layers' affine parameters move. A cosine schedule ends
    at a learning rate of zero."""
    import torch

    from isl.finetune import tuned_parameters
    from segmentation.network import NetworkConfig, build_network
    from segmentation.transfer import encoder_parameters

    torch.manual_seed(0)
    net = build_network(NetworkConfig(channels=(4, 8, 16), strides=(2, 2)), 1, 3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    moved = {id(p) for p in tuned_parameters(net, which)}
    encoder = {id(p) for p in encoder_parameters(net)}
    if which == "decoder":
        assert moved and not moved & encoder and len(moved) + len(encoder) == len(before)
    else:
        assert moved and all(p.dim() == 1 for p in net.parameters() if id(p) in moved)
    opt = torch.optim.SGD([p for p in net.parameters() if id(p) in moved], lr=0.5)
    net(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    opt.step()
    for name, p in net.named_parameters():
        changed = not torch.equal(p, before[name])
        if id(p) not in moved:
            assert not changed, name
        elif p.grad is not None and bool(p.grad.abs().max() > 1e-4):
            # a bias just before an instance norm has a gradient near 1e-9 and may not move in float32
            assert changed, name
    assert any(not torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_a_cosine_schedule_anneals_the_finetuning_rate_to_zero(tiny_bundle, phantom_dataset):
    import torch

    from imaging.dataset import load_case, load_dataset
    from isl.config import ISLConfig
    from isl.finetune import FineTuning
    from isl.mask import initial_mask
    from isl.refiner import load_refiner

    cfg = ISLConfig(device="cpu", atlases=2, finetune_steps=4, min_steps=4, finetune_schedule="cosine",
                    finetune_params="decoder")
    refiner = load_refiner(tiny_bundle, phantom_dataset, cfg)
    ds = load_dataset(phantom_dataset)
    vols, _, _ = load_case(ds, ds.case("phantom_001"))
    start = initial_mask(refiner.net, refiner.pre.images(vols)[0], refiner.pre, True, torch.device("cpu"))
    tuning = FineTuning(refiner.net, start, cfg, np.random.default_rng(0), torch.device("cpu"))
    rates = []
    for _ in range(4):
        tuning.opt.step()
        tuning.sched.step()
        rates.append(tuning.opt.param_groups[0]["lr"])
    assert rates[0] < cfg.finetune_lr and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(p.requires_grad for p in refiner.net.parameters())  # the bundle's own network is untouched
    res = refiner.refine(refiner.pre.images(vols)[0])
    assert res.qa["finetune_steps"] == 4


def test_weight_space_blending_lands_between_the_network_and_its_tuned_copy():
    """`finetune_interpolation` (WiSE-FT): alpha 1 is the tuned copy itself, alpha 0 the network's weights, and
    alpha 0.25 the point a quarter of the way from the network to the tuned copy; neither input is changed."""
    import copy

    import torch

    from isl.finetune import blended
    from segmentation.network import NetworkConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetworkConfig(channels=(4, 8), strides=(2,)), 1, 2)
    tuned = copy.deepcopy(net)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    assert blended(net, tuned, 1.0) is tuned
    zero, quarter = blended(net, tuned, 0.0), blended(net, tuned, 0.25)
    for (name, p), q0, q25, t in zip(net.named_parameters(), zero.parameters(), quarter.parameters(),
                                     tuned.parameters()):
        assert torch.allclose(q0, p), name
        assert torch.allclose(q25, p + 0.25), name
        assert torch.allclose(t, p + 1.0), name


def test_an_override_of_a_nested_config_changes_only_the_fields_it_names():
    from pathlib import Path

    from isl.bundle import ISLBundle

    meta = {"version": "m-1", "refinement": {"config": {
        "atlases": 8, "affine": {"kind": "similarity", "steps": 40}, "registration": {"steps": 12},
        "label_fusion_weights": {"a": 0.5, "b": 0.25}}}}
    cfg = ISLBundle(None, None, meta, Path(".")).refinement_config(
        {"affine": {"kind": "affine"}, "label_fusion_weights": {"a": 1.0}})
    assert (cfg.affine.kind, cfg.affine.steps, cfg.registration.steps, cfg.atlases) == ("affine", 40, 12, 8)
    assert cfg.label_fusion_weights == {"a": 1.0}  # a map is replaced, not merged
