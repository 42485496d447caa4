"""Transfer learning (`isl train --init-from`): the layers that fit are copied whatever the source's organ, modality
or number of labels, the output layer is new, the encoder can be held still, and the card records the lineage of
a two-stage transfer."""
import numpy as np
import torch


def test_what_fits_is_copied_and_the_input_and_output_layers_that_do_not_are_new():
    from segmentation.network import NetworkConfig, build_network
    from segmentation.transfer import HEAD, copy_fitting, encoder_parameters

    torch.manual_seed(0)
    source, target = build_network(NetworkConfig(), 1, 8), build_network(NetworkConfig(), 2, 3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = copy_fitting(target, source.state_dict(), (HEAD,))
    after, theirs = target.state_dict(), source.state_dict()
    assert "shape (16, 1, 3, 3, 3) in the source, (16, 2, 3, 3, 3) here" in report.new["model.0.conv.unit0.conv.weight"]
    assert report.new["model.2.0.conv.bias"] == "output layer (a new task)"
    assert all(k.startswith(("model.0.conv.unit0.conv.weight", "model.0.residual.weight", HEAD)) for k in report.new)
    assert len(report.copied) + len(report.new) == len(after) and len(report.copied) > 0.8 * len(after)
    for k in after:
        assert torch.equal(after[k], theirs[k] if k in report.copied else before[k]), k

    names = {id(p): n for n, p in target.named_parameters()}
    encoder = {names[id(p)] for p in encoder_parameters(target)}
    assert "model.0.conv.unit0.conv.weight" in encoder and "model.1.submodule.1.submodule.0.residual.bias" in encoder
    assert "model.1.submodule.1.submodule.1.submodule.conv.unit1.conv.weight" in encoder  # the bottom layer
    assert not any(n.startswith(HEAD) or ".2.0." in n or ".2.1." in n for n in encoder)  # no up-sampling block
    assert len(encoder) < len(names)


def test_a_frozen_encoder_stays_still_for_its_steps_while_the_rest_trains():
    from segmentation.network import NetworkConfig, build_network
    from segmentation.train import TrainConfig, train_network
    from segmentation.transfer import encoder_parameters

    rng = np.random.default_rng(0)
    images = [rng.random((1, 24, 24, 24), dtype=np.float32) for _ in range(2)]
    labels = [(im[0] > 0.5).astype(np.int64) for im in images]
    torch.manual_seed(0)
    net = build_network(NetworkConfig(channels=(8, 16), strides=(2,), num_res_units=1), 1, 2)
    encoder = encoder_parameters(net)
    start = [p.detach().clone() for p in net.parameters()]
    enc_ids = {id(p) for p in encoder}
    train_network(net, images, labels, (16, 16, 16), TrainConfig(iterations=3), torch.device("cpu"),
                  frozen=(encoder, 3))
    for p, p0 in zip(net.parameters(), start):
        assert torch.equal(p, p0) == (id(p) in enc_ids)
    assert all(p.requires_grad for p in net.parameters())  # released for whatever trains next


def test_init_from_crosses_modality_and_label_count_and_a_second_stage_carries_the_lineage(
        tiny_bundle, phantom_dataset, two_sequence_dataset, tmp_path, capsys):
    from isl.bundle import ISLBundle
    from worker.cli import main

    other = two_sequence_dataset
    fast = ["--iterations", "20", "--reg-iterations", "10", "--validation", "0", "--threads", "2"]
    assert main(["train", "--dataset", str(other), "--out", str(tmp_path / "b"), "--init-from", str(tiny_bundle),
                 "--freeze-encoder", "10", "--lr", "0.001", *fast]) == 0
    b = ISLBundle.load(tmp_path / "b")
    t = b.meta["transfer"]
    source = ISLBundle.load(tiny_bundle)
    assert t["version"] == source.version and t["channels"] == ["MRI"] and t["labels"] == ["head", "tail"]
    assert t["freeze_encoder_steps"] == 10 and t["lr"] == 0.001 and b.meta["config"]["training"]["lr"] == 0.001
    assert "shape" in t["segmentation"]["new_tensors"]["model.0.conv.unit0.conv.weight"]  # 1 channel there, 2 here
    assert t["segmentation"]["new_tensors"]["model.2.0.conv.weight"] == "output layer (a new task)"
    assert t["registration"]["new"] == 0 and t["registration"]["copied"] > 0
    assert b.segmentation.labels == {0: "background", 1: "whole"} and b.meta["dataset"]["channels"] == ["T1", "T2"]
    assert b.meta["config"]["network"] == source.meta["config"]["network"]

    # second stage: back to the phantoms' task, from the bundle that was itself transferred
    assert main(["train", "--dataset", str(phantom_dataset), "--out", str(tmp_path / "c"), "--holdout", "2",
                 "--init-from", str(tmp_path / "b"), *fast]) == 0
    c = ISLBundle.load(tmp_path / "c")
    assert [a["version"] for a in c.meta["transfer"]["lineage"]] == [source.version, b.version]
    card = (tmp_path / "c" / "MODEL_CARD.md").read_text()
    assert (f"transfer lineage, oldest first: {source.meta['name']} (Phantom: MRI; head, tail) > b (Inverse: "
            "T1, T2; whole) > this bundle") in card
    assert "Encoder held still for the first 0 iterations" in card

    capsys.readouterr()
    assert main(["train", "--dataset", str(phantom_dataset), "--out", str(tmp_path / "d"), "--freeze-encoder", "5",
                 *fast]) == 2
    err = capsys.readouterr().err
    assert "freezing the encoder needs a transferred one" in err


def test_init_from_a_folder_that_is_no_bundle_is_refused_before_any_training(phantom_dataset, tmp_path, capsys):
    from worker.cli import main

    assert main(["train", "--dataset", str(phantom_dataset), "--out", str(tmp_path / "x"), "--init-from",
                 str(tmp_path), "--iterations", "5"]) == 2
    assert "bundle.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
