"""Ensembles as one model: k-fold members (`isl train --folds K`) or one member per sequence (`--per-sequence`),
combined by probability averaging or majority vote, refined by ISL like any network. (The service test of a model of
two sequences serves a per-sequence ensemble: tests/service/test_multisequence.py.)"""
import json

import numpy as np
import pytest
import torch


def test_the_ensemble_averages_or_votes_and_fine_tunes_on_the_mean():
    from segmentation.network import NetworkConfig, build_network

    torch.manual_seed(0)
    small = {"channels": (4, 8), "strides": (2,), "num_res_units": 1}
    mean = build_network(NetworkConfig(**small, members=3), 1, 3).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        outs = [m(x).softmax(1) for m in mean.members]
        combined = mean(x).softmax(1)
    assert torch.allclose(combined, torch.stack(outs).mean(0), atol=1e-5)

    vote = build_network(NetworkConfig(**small, members=3, combine="vote"), 1, 3).eval()
    vote.load_state_dict(mean.state_dict())
    with torch.no_grad():
        voted = vote(x).argmax(1)
    ballots = torch.stack([o.argmax(1) for o in outs])
    majority = (ballots == ballots[0]).sum(0) >= 2
    assert torch.equal(voted[majority], ballots[0][majority])  # two of three agree: their label
    vote.train()
    assert torch.allclose(vote(x).softmax(1), combined, atol=1e-5)  # fine-tuning sees the mean, which has a gradient

    per_seq = build_network(NetworkConfig(**small, members=2, combine="vote", member_inputs="one_each"), 2, 3)
    assert per_seq.members[0].model[0].conv.unit0.conv.weight.shape[1] == 1  # each member reads one sequence
    assert per_seq(torch.rand(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


@pytest.mark.trains
def test_a_k_fold_ensemble_trains_as_one_bundle_and_refines(phantom_dataset, tmp_path, capsys):
    from isl.bundle import ISLBundle
    from segmentation.network import Ensemble
    from worker.cli import main
    from worker.demo import QUICK_REFINEMENT, set_refinement

    fast = ["--iterations", "30", "--reg-iterations", "20", "--validation", "0", "--threads", "2", "--holdout", "2"]
    assert main(["train", "--dataset", str(phantom_dataset), "--out", str(tmp_path / "e"), "--folds", "3",
                 "--combine", "vote", *fast]) == 0
    set_refinement(tmp_path / "e", QUICK_REFINEMENT, phantom_dataset)  # ISL on a test's scale
    bundle = ISLBundle.load(tmp_path / "e")
    plan = bundle.meta["ensemble"]
    assert isinstance(bundle.segmentation.network, Ensemble) and len(bundle.segmentation.network.members) == 3
    assert plan["kind"] == "folds" and [len(c) for c in plan["member_cases"]] == [4, 4, 4]
    train = bundle.meta["train_cases"]
    left_out = [sorted(set(train) - set(c)) for c in plan["member_cases"]]
    assert sorted(sum(left_out, [])) == sorted(train)  # every training case left out by exactly one member
    card = (tmp_path / "e" / "MODEL_CARD.md").read_text()
    assert "Ensemble of 3 such networks, one per fold, each trained without its fold (4, 4, 4 cases), combined by " \
           "majority vote" in card
    case = phantom_dataset / "imagesTr" / "phantom_000.nii.gz"
    assert main(["refine", str(case), "--model", str(tmp_path / "e"), "--out", str(tmp_path / "out"),
                 "--atlas-dir", str(phantom_dataset), "--threads", "2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_version"] == bundle.version and report["qa"]["method"] == "isl"
    steps = report["qa"]["finetune_steps"]  # the ensemble is fine-tuned on its mean, stopping by the rule's bounds
    assert QUICK_REFINEMENT["min_steps"] <= steps <= QUICK_REFINEMENT["finetune_steps"], report["qa"]
    assert report["qa"]["stopped_early"] == (steps < QUICK_REFINEMENT["finetune_steps"])

    capsys.readouterr()
    assert main(["train", "--dataset", str(phantom_dataset), "--out", str(tmp_path / "x"), "--folds", "2",
                 "--per-sequence", *fast]) == 2
    assert "an ensemble is of folds or of sequences, not both" in capsys.readouterr().err
    assert main(["train", "--dataset", str(phantom_dataset), "--out", str(tmp_path / "y"), "--per-sequence",
                 *fast]) == 2
    assert "a per-sequence ensemble needs several sequences; the dataset has ['MRI']" in capsys.readouterr().err


@pytest.mark.trains
def test_a_per_sequence_ensemble_gives_each_member_its_own_sequence(two_sequence_dataset, tmp_path):
    from isl.bundle import ISLBundle
    from isl.training.train import BundleTrainConfig, train_bundle

    cfg = BundleTrainConfig(holdout=2, validation=0, per_sequence=True, combine="vote")
    cfg.training.iterations, cfg.registration.iterations = 30, 20
    train_bundle(two_sequence_dataset, tmp_path / "p", cfg, torch.device("cpu"), progress=lambda m: None)
    bundle = ISLBundle.load(tmp_path / "p")
    net = bundle.segmentation.network
    assert bundle.meta["ensemble"]["sequences"] == ["T1", "T2"] and net.member_inputs == "one_each"
    first = [p.detach().clone() for p in net.members[0].parameters()]
    second = [p.detach().clone() for p in net.members[1].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # trained apart, on different sequences
    assert np.isfinite(bundle.meta["training"]["segmentation_final_loss"])
