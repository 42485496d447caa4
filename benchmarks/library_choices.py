"""Where a library does what a hand-written function did: same result, and time per call, printed as JSON.

    python -m benchmarks.library_choices --json benchmarks/results/library_choices.json

- ROI crop: segmentation.preprocess.crop vs MONAI SpatialCrop + BorderPad (MONAI has no paste back; at the border
  SpatialCrop moves the box inward instead of keeping it centred, so the boxes differ there).
- Folding: registration.instance.folding_fraction (SimpleITK's Jacobian determinant) vs the numpy.gradient
  version it replaced.
- Label volumes: worker.pipeline.label_volumes_ml (SimpleITK's label statistics) vs counting voxels.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import add_options, emit, stamped


def _time(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return round((time.perf_counter() - t0) / repeat * 1000, 3)


def _monai_crop(array, center, size):
    from monai.transforms import BorderPad, SpatialCrop

    cropped = SpatialCrop(roi_center=center, roi_size=size)(array)
    before = [max(0, s // 2 - c) for c, s in zip(center, size)]
    after = [s - b - n for s, b, n in zip(size, before, cropped.shape[1:])]
    return np.asarray(BorderPad([v for pair in zip(before, after) for v in pair], mode="constant")(cropped))


def _numpy_folding(disp) -> float:
    u = disp.double().numpy()
    grads = [np.gradient(u[:, c], axis=(1, 2, 3)) for c in range(3)]
    jac = np.empty(u.shape[:1] + u.shape[2:] + (3, 3))
    for c in range(3):
        for d in range(3):
            jac[..., c, d] = grads[c][d] + (1.0 if c == d else 0.0)
    return float((np.linalg.det(jac) <= 0).mean())


def crop_case(rng) -> dict:
    from segmentation.preprocess import crop

    array = rng.random((3, 96, 120, 100), dtype=np.float32)
    out = {}
    for where, center in (("inside", (48, 60, 50)), ("at the border", (10, 60, 95))):
        ours, theirs = crop(array, center, (64, 64, 64)), _monai_crop(array, center, (64, 64, 64))
        out[where] = {"same": bool(ours.shape == theirs.shape and np.array_equal(ours, theirs)),
                      "ours_ms": _time(lambda c=center: crop(array, c, (64, 64, 64)), 50),
                      "monai_ms": _time(lambda c=center: _monai_crop(array, c, (64, 64, 64)), 50)}
    return out


def folding_case(rng) -> dict:
    import torch
    from scipy.ndimage import gaussian_filter

    from registration.instance import folding_fraction

    disp = torch.from_numpy(np.stack([np.stack([gaussian_filter(rng.normal(0, 1, (64, 64, 64)), 3) * 40
                                                for _ in range(3)]) for _ in range(14)]).astype(np.float32))
    a, b = folding_fraction(disp), _numpy_folding(disp)
    return {"fields": "14 x (3, 64, 64, 64)", "simpleitk": a, "numpy": b, "same": bool(a == b),
            "simpleitk_ms": _time(lambda: folding_fraction(disp), 3),
            "numpy_ms": _time(lambda: _numpy_folding(disp), 3)}


def volume_case(rng) -> dict:
    from imaging.io import Geometry
    from worker.pipeline import label_volumes_ml

    zz, yy, xx = np.mgrid[:160, :256, :256]  # two organs in a 160 x 256 x 256 scan
    labels = np.zeros((160, 256, 256), np.uint16)
    labels[(zz - 80) ** 2 / 900 + (yy - 100) ** 2 / 1600 + (xx - 90) ** 2 / 1200 < 1] = 1
    labels[(zz - 70) ** 2 / 400 + (yy - 150) ** 2 / 900 + (xx - 170) ** 2 / 700 < 1] = 2
    geometry = Geometry((256, 256, 160), (0.8, 0.9, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    names = {0: "background", 1: "a", 2: "b"}

    def counted():
        return {names[v]: round(float(np.count_nonzero(labels == v)) * 0.8 * 0.9 * 1.5 / 1000, 3) for v in (1, 2)}

    ours = label_volumes_ml(labels, geometry, names)
    return {"same": bool(ours == counted()), "counting_ms": _time(counted, 10),
            "simpleitk_ms": _time(lambda: label_volumes_ml(labels, geometry, names), 10)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, json=None, threads=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    emit(stamped({"crop": crop_case(rng), "folding": folding_case(rng), "label_volumes": volume_case(rng)}), args.json)


if __name__ == "__main__":
    main()
