"""The global stage: a posed copy of a shape is brought back onto it, the transform described in physical units,
an implausible one flagged, the identity left alone."""
import math

import numpy as np
import torch

from registration import affine
from registration.affine import AffineConfig

SHAPE = (32, 40, 36)  # z, y, x
SPACING = (1.0, 1.0, 2.0)  # x, y, z mm: anisotropic, so that a rotation in voxels would be a shear


def _ellipsoid(a: np.ndarray, t=(0.0, 0.0, 0.0), shape=SHAPE) -> torch.Tensor:
    """An ellipsoid (semi-axes 14, 8, 5 mm along x, y, z) sampled through p_shape = A p + t (mm about the grid's
    centre), as (1, 1, z, y, x)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING[::-1])]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    p = np.stack([x, y, z], -1) @ a.T + np.asarray(t)
    inside = (p[..., 0] / 14) ** 2 + (p[..., 1] / 8) ** 2 + (p[..., 2] / 5) ** 2 <= 1
    return torch.from_numpy(inside.astype(np.float32))[None, None]


def _rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def test_a_posed_shape_is_brought_back_and_described():
    atlas = _ellipsoid(np.eye(3))
    pose = 0.8 * _rotation_z(20)  # the scan's shape: the atlas's, rotated 20 degrees and 1.25 times larger
    scan = _ellipsoid(pose, np.array([2.0, -1.0, 0.0]))
    before = _dice(atlas, scan)
    cfg = AffineConfig(kind="similarity", steps=150, lr=0.03, downsample=1)
    th = affine.fit(atlas * 0.7 + 0.1, atlas, scan * 0.7 + 0.1, scan, SPACING, cfg)
    after = _dice((affine.warp(atlas, th) > 0.5).float(), scan)
    assert before < 0.75 and after > 0.9, (before, after)
    (described,) = affine.describe(th, SHAPE, SPACING, cfg)
    # scan to atlas sampling: the atlas is 0.8 times the scan's size, rotated back by 20 degrees
    assert np.allclose(described["scale"], 0.8, atol=0.05), described
    assert abs(described["rotation_deg"] - 20) < 4, described
    assert described["plausible"]


def test_the_identity_stays_where_the_shapes_agree():
    atlas = _ellipsoid(np.eye(3))
    cfg = AffineConfig(kind="affine", steps=40, downsample=1)
    th = affine.fit(atlas, atlas, atlas, atlas, SPACING, cfg)
    (described,) = affine.describe(th, SHAPE, SPACING, cfg)
    assert np.allclose(described["scale"], 1.0, atol=0.03) and described["rotation_deg"] < 2, described
    assert _dice((affine.warp(atlas, th) > 0.5).float(), atlas) > 0.97


def test_none_is_the_identity_and_far_poses_are_implausible():
    atlas = _ellipsoid(np.eye(3))
    th = affine.fit(atlas, atlas, atlas, atlas, SPACING, AffineConfig())
    assert (affine.warp(atlas, th) - atlas).abs().max() < 1e-5
    cfg = AffineConfig(max_scale=1.5, max_rotation=45)
    shape_mm = affine.theta(torch.tensor(_rotation_z(60))[None].float(), torch.zeros(1, 3), SHAPE, SPACING)
    scaled = affine.theta(torch.eye(3)[None] * 1.8, torch.zeros(1, 3), SHAPE, SPACING)
    flipped = affine.theta(torch.diag(torch.tensor([-1.0, 1, 1]))[None], torch.zeros(1, 3), SHAPE, SPACING)
    described = affine.describe(torch.cat([shape_mm, scaled, flipped]), SHAPE, SPACING, cfg)
    assert abs(described[0]["rotation_deg"] - 60) < 0.1 and not described[0]["plausible"]
    assert np.allclose(described[1]["scale"], 1.8) and not described[1]["plausible"]
    assert not described[2]["plausible"]


def test_the_aligner_leaves_out_an_atlas_whose_transform_is_implausible():
    """Three atlases toward one scan: two of its size are brought onto it; one of half its size needs a scale of
    0.5, beyond max_scale 1.5, and is left out of the atlases handed on, while the report still describes it."""
    from isl.align import Aligner
    from isl.bundle import Atlases
    from registration.model import Registrar, RegistrationConfig

    small = np.diag([2.0, 2.0, 2.0])
    labels = torch.cat([_ellipsoid(np.eye(3)), _ellipsoid(_rotation_z(10)), _ellipsoid(small)])  # (3, 1, ...)
    onehot = torch.cat([1 - labels, labels], 1)
    atlases = Atlases(["same", "turned", "small"], labels * 0.7 + 0.1, onehot)
    aligner = Aligner(Registrar(RegistrationConfig()), atlases, torch.device("cpu"), SPACING)
    scan = _ellipsoid(np.eye(3))
    probs = torch.cat([1 - scan, scan], 1)[0].numpy()
    cfg = AffineConfig(kind="similarity", steps=120, lr=0.03, downsample=1, max_scale=1.5)
    moved, described = aligner.global_stage(scan * 0.7 + 0.1, probs, cfg)
    assert moved.ids == ["same", "turned"] and list(described) == ["same", "turned", "small"]
    assert not described["small"]["plausible"] and described["small"]["scale"][0] < 1 / 1.5
    assert abs(described["turned"]["rotation_deg"] - 10) < 3, described["turned"]
    for i in range(2):  # the kept atlases now lie on the scan
        assert _dice((moved.onehot[i, 1:] > 0.5).float(), scan[0]) > 0.9
    same, none = aligner.global_stage(scan, probs, AffineConfig())
    assert same is aligner and none == {}  # no global stage: the atlases as they were


def test_a_global_transform_samples_the_atlas_s_context_crop():
    """An atlas 1.6 times the scan's size overflows the region (its x semi-axis 22 mm, the region's 18); zoomed out
    from its context crop it lands whole on the scan, from the region's crop it loses its ends."""
    from isl.align import Aligner
    from isl.bundle import Atlases, context_size
    from registration.model import Registrar, RegistrationConfig

    big = np.eye(3) / 1.6
    roi, ctx = _ellipsoid(big), _ellipsoid(big, shape=context_size(SHAPE))
    scan = _ellipsoid(np.eye(3))
    probs = torch.cat([1 - scan, scan], 1)[0].numpy()
    cfg = AffineConfig(kind="similarity", steps=150, lr=0.03, downsample=1, max_scale=2.0)
    dices = []
    for context in (None, (ctx * 0.7 + 0.1, ctx[:, 0].to(torch.uint8))):
        atlases = Atlases(["big"], roi * 0.7 + 0.1, torch.cat([1 - roi, roi], 1), None, *(context or (None, None)))
        moved, described = Aligner(Registrar(RegistrationConfig()), atlases, torch.device("cpu"),
                                   SPACING).global_stage(scan * 0.7 + 0.1, probs, cfg)
        assert abs(described["big"]["scale"][0] - 1.6) < 0.1, described
        dices.append(_dice((moved.onehot[0, 1:] > 0.5).float(), scan[0]))
    assert dices[1] > 0.95 and dices[1] > dices[0] + 0.03, dices
