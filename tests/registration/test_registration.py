"""Registration: identity on identical images, better overlap with little folding on real pairs."""
import numpy as np
import pytest
import torch

from imaging import metrics
from registration.fusion import fuse_labels, local_similarity
from registration.instance import InstanceConfig, folding_fraction, instance_optimise
from registration.model import Losses, Registrar, RegistrationConfig


@pytest.fixture(scope="module")
def registrar():
    torch.manual_seed(0)
    return Registrar(RegistrationConfig()).eval()


def _blob(shape, center, radii):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    d = sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3))
    return (d <= 1).astype(np.float32)


def test_identical_images_stay_unchanged(registrar):
    shape = (32, 40, 32)
    blob = _blob(shape, (16, 20, 16), (7, 12, 6))
    image = torch.from_numpy(blob * 0.6 + 0.2)[None, None]
    label = torch.from_numpy(blob)[None, None]
    u0 = torch.zeros(1, 3, *[n // 2 for n in shape])
    u = instance_optimise(registrar, image, label, image, label, u0, InstanceConfig(steps=20))
    disp = registrar.upsample(u, shape)
    # linear interpolation's one-sided gradient at grid points lets Adam wander a little at the identity:
    # sub-voxel and only at edges, so the warped image and label are the same in every practical sense
    assert disp.abs().mean() < 0.1
    warped = registrar.warp(image, disp)
    assert (warped - image).abs().mean() < 1e-3
    losses = Losses(5)
    assert 1 - losses.overlap(registrar.warp(label, disp), label).item() > 0.98
    assert folding_fraction(disp) == 0.0


def test_instance_optimisation_aligns_shifted_blob(registrar):
    shape = (32, 40, 32)
    fixed_lab = torch.from_numpy(_blob(shape, (16, 20, 16), (7, 12, 6)))[None, None]
    moving_lab = torch.from_numpy(_blob(shape, (18, 22, 15), (6, 10, 7)))[None, None]
    fixed, moving = fixed_lab * 0.6 + 0.2, moving_lab * 0.6 + 0.2
    losses = Losses(5)
    before = 1 - losses.overlap(moving_lab, fixed_lab).item()
    u0 = torch.zeros(1, 3, *[n // 2 for n in shape])
    u = instance_optimise(registrar, moving, moving_lab, fixed, fixed_lab, u0, InstanceConfig(steps=60, lr=0.1))
    disp = registrar.upsample(u, shape)
    after = 1 - losses.overlap(registrar.warp(moving_lab, disp), fixed_lab).item()
    assert after > before + 0.05, (before, after)
    assert folding_fraction(disp) < 0.01


def test_folding_fraction_detects_a_fold():
    disp = torch.zeros(1, 3, 8, 8, 8)
    disp[0, 0, 4:] = -3.0  # slices past 4 jump back over their neighbours
    assert folding_fraction(disp) > 0
    assert folding_fraction(torch.zeros(1, 3, 8, 8, 8)) == 0.0


def test_local_similarity_is_the_local_correlation():
    g = torch.Generator().manual_seed(0)
    scan = torch.rand(1, 1, 20, 22, 24, generator=g)
    other = torch.rand(1, 1, 20, 22, 24, generator=g)
    local = local_similarity(torch.cat([scan, 1 - scan, 0.5 * scan + 0.1, other]), scan, window=5)
    assert local.shape == (4, 1, 20, 22, 24)
    means = local.flatten(1).mean(1)
    # border windows are smaller (zero padding) but still exact: identical, inverted, affine, unrelated
    assert means[0] > 0.999 and means[1] < -0.999 and means[2] > 0.999 and abs(means[3]) < 0.05


def _textured_case(shift=0):
    """A smooth random texture with a blob label, both shifted by `shift` voxels along z."""
    g = torch.Generator().manual_seed(1)
    noise = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 30, 30, 30, generator=g), 3, 1, 1)
    image = (noise - noise.min()) / (noise.max() - noise.min())
    blob = torch.from_numpy(_blob((30, 30, 30), (15, 15, 15), (6, 8, 5)))[None, None]
    label = torch.cat([1 - blob, blob], 1)
    return torch.roll(image, shift, 2), torch.roll(label, shift, 2)


def test_fusion_without_search_is_the_local_ncc_softmax():
    scan, _ = _textured_case()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 1, 30, 30, 30, generator=g)
    labels = torch.softmax(torch.randn(3, 2, 30, 30, 30, generator=g), 1)
    fused = fuse_labels(images, labels, scan, beta=30, window=5)
    weight = torch.softmax(30 * local_similarity(images, scan, 5), 0)
    assert torch.allclose(fused, (weight * labels).sum(0), atol=1e-5)
    assert torch.allclose(fuse_labels(images, labels, scan, beta=0, window=5), labels.mean(0))


def test_fusion_search_absorbs_a_one_voxel_misregistration():
    scan, truth = _textured_case()
    shifted_image, shifted_label = _textured_case(shift=1)  # an atlas registered one voxel off
    images, labels = torch.cat([shifted_image, shifted_image]), torch.cat([shifted_label, shifted_label])

    def dice(p):
        return metrics.dice(p.argmax(0).numpy(), truth[0, 1].numpy().astype(int), [1])[1]

    local = dice(fuse_labels(images, labels, scan, beta=30, window=5, search=0))
    non_local = dice(fuse_labels(images, labels, scan, beta=30, window=5, search=1))
    assert local < 0.95 and non_local > 0.99


@pytest.mark.shared_data
def test_real_pair_dice_rises_with_little_folding(hippocampus):
    """Two real hippocampus cases, the committed bundle's learned registration, then instance optimisation."""
    from pathlib import Path

    from imaging.dataset import load_case, load_dataset
    from isl.bundle import ISLBundle, atlas_roi

    model = Path(__file__).resolve().parents[2] / "models" / "hippocampus_few"
    if not (model / "bundle.json").exists():
        pytest.skip(f"{model} is not trained yet")
    bundle = ISLBundle.load(model)
    pre, reg = bundle.segmentation.preprocessing, bundle.registrar
    ds = load_dataset(hippocampus)
    rois = []
    for case_id in ("hippocampus_001", "hippocampus_004"):
        vols, lab, _ = load_case(ds, ds.case(case_id))
        img, onehot = atlas_roi(pre.images(vols)[0], pre.label(lab), pre.roi_size, 3)
        rois.append((torch.from_numpy(img)[None, :1], torch.from_numpy(onehot)[None, 1:]))
    (mov, mov_lab), (fix, fix_lab) = rois
    losses = Losses(reg.cfg.ncc_window)
    before = 1 - losses.overlap(mov_lab, fix_lab).item()
    with torch.no_grad():
        v0 = reg.velocity(mov, fix)
    net_dice = 1 - losses.overlap(reg.warp(mov_lab, reg.displacement(v0, fix.shape[2:])), fix_lab).item()
    u = instance_optimise(reg, mov, mov_lab, fix, fix_lab, reg.integrate(v0), InstanceConfig(steps=30))
    disp = reg.upsample(u, fix.shape[2:])
    after = 1 - losses.overlap(reg.warp(mov_lab, disp), fix_lab).item()
    assert net_dice > before + 0.05, (before, net_dice)
    assert after >= net_dice - 0.01, (net_dice, after)
    assert folding_fraction(disp) < 0.01


def test_a_checkpoint_this_version_cannot_describe_is_a_bundle_error(registrar, tmp_path):
    from imaging.errors import BundleError

    registrar.save(tmp_path / "reg.pt")
    ckpt = torch.load(tmp_path / "reg.pt", weights_only=True)
    ckpt["config"]["a_knob_from_the_future"] = 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(BundleError, match="future.pt: its description does not fit"):
        Registrar.load(tmp_path / "future.pt")
    ckpt["config"].pop("a_knob_from_the_future")
    ckpt["state_dict"].popitem()
    torch.save(ckpt, tmp_path / "short.pt")
    with pytest.raises(BundleError, match="short.pt: its weights do not fit"):
        Registrar.load(tmp_path / "short.pt")
    assert isinstance(Registrar.load(tmp_path / "reg.pt"), Registrar)
