"""Posed copies of the test cases of a bundle (the labelled cases it never trained on, configured on or uses as
atlases), to measure the alignment where the scans are not pre-aligned as the training crops are. Each case is
turned by a random similarity transform about its labels' centre (rotation about each axis up to --rotation degrees,
isotropic scale within 1/--scale..--scale, translation up to --shift mm), resampled on its own grid (linear for the
image, nearest for the label; outside the scan, the scan's lowest value), then cropped by up to --crop of each side,
never into the labelled region plus --margin voxels. Seeded; `poses.json` records every case's transform and crop.

    python -m benchmarks.posed_dataset --model models/headneck_ct --dataset ../shared/data/headneck_ct \\
        --out data/posed_headneck_ct --cases 15
    isl evaluate --dataset data/posed_headneck_ct --atlas-dir ../shared/data/headneck_ct --model models/headneck_ct \\
        --json /tmp/posed.json --cases 15

The output holds derived copies of the source data: keep it out of the repository (`data/` is git-ignored)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.common import REQUIRED, add_options, emit, stamped
from imaging.dataset import load_dataset
from isl.evaluation.evaluate import eligible_cases
from isl.meta import BundleMeta


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    """The rotation about x, then y, then z by `angles_deg` (3,)."""
    rx, ry, rz = np.radians(angles_deg)
    x = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    y = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
    z = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


def draw_pose(label: sitk.Image, rng: np.random.Generator, args) -> tuple[sitk.Transform, tuple, dict]:
    """One random pose of a case: the transform (output point -> the source point it samples), the crop (slices in
    sitk's x, y, z order) and the pose as JSON."""
    angles = rng.uniform(-args.rotation, args.rotation, 3)
    scale = float(np.exp(rng.uniform(-math.log(args.scale), math.log(args.scale))))
    shift = rng.uniform(-args.shift, args.shift, 3)
    fg = sitk.GetArrayFromImage(label) > 0
    centre = label.TransformContinuousIndexToPhysicalPoint(np.argwhere(fg).mean(0)[::-1].tolist())
    transform = sitk.AffineTransform(3)
    transform.SetCenter(centre)
    transform.SetMatrix((scale * rotation(angles)).ravel().tolist())
    transform.SetTranslation(shift.tolist())
    posed_label = sitk.Resample(label, label, transform, sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    box = _crop_box(sitk.GetArrayViewFromImage(posed_label) > 0, rng, args.crop, args.margin)
    pose = {"rotation_deg_xyz": np.round(angles, 2).tolist(), "scale": round(scale, 4),
            "translation_mm": np.round(shift, 2).tolist(), "centre_mm": np.round(centre, 2).tolist(),
            "crop_voxels_zyx": [list(b) for b in box]}
    return transform, tuple(slice(a, b) for a, b in box[::-1]), pose


def apply_pose(image: sitk.Image, transform: sitk.Transform, crop: tuple, label: bool = False) -> sitk.Image:
    """`image` through a drawn pose: resampled on its own grid (nearest for a label; outside the scan, background
    or the scan's lowest value), then cropped."""
    if label:
        return sitk.Resample(image, image, transform, sitk.sitkNearestNeighbor, 0, image.GetPixelID())[crop]
    low = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, transform, sitk.sitkLinear, low, image.GetPixelID())[crop]


def _crop_box(fg: np.ndarray, rng: np.random.Generator, share: float, margin: int) -> list[tuple[int, int]]:
    """(start, stop) per array axis: up to `share` of each side cut, never within `margin` voxels of `fg`."""
    idx = np.argwhere(fg)
    lo, hi = (idx.min(0), idx.max(0) + 1) if len(idx) else (np.zeros(3, int), np.array(fg.shape))
    box = []
    for n, a, b in zip(fg.shape, lo, hi):
        start = int(min(rng.uniform(0, share) * n, max(0, a - margin)))
        stop = int(max(n - rng.uniform(0, share) * n, min(n, b + margin)))
        box.append((start, stop))
    return box


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, model=REQUIRED, dataset=REQUIRED)
    ap.add_argument("--out", type=Path, required=True, help="the posed dataset's folder (created)")
    ap.add_argument("--cases", type=int, default=0, help="the first N test cases (0: all)")
    ap.add_argument("--rotation", type=float, default=15.0, help="largest rotation about each axis (degrees)")
    ap.add_argument("--scale", type=float, default=1.15, help="largest isotropic scale (and its inverse)")
    ap.add_argument("--shift", type=float, default=15.0, help="largest translation along each axis (mm)")
    ap.add_argument("--crop", type=float, default=0.15, help="largest share of each side cropped away")
    ap.add_argument("--margin", type=int, default=8, help="voxels kept around the labelled region")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ds = load_dataset(args.dataset)
    meta = BundleMeta.model_validate(json.loads((Path(args.model) / "bundle.json").read_text()))
    ids = eligible_cases(ds, meta, args.cases or None)
    source = json.loads((Path(args.dataset) / "dataset.json").read_text())
    rng, poses = np.random.default_rng(args.seed), {}
    for sub in ("imagesTr", "labelsTr"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    for case_id in ids:
        case = ds.case(case_id)
        label = sitk.ReadImage(str(case.label_path))
        transform, crop, poses[case_id] = draw_pose(label, rng, args)
        for path in case.image_paths:  # every channel through the same pose
            posed = apply_pose(sitk.ReadImage(str(path)), transform, crop)
            sitk.WriteImage(posed, str(args.out / "imagesTr" / path.name))
        posed = apply_pose(label, transform, crop, label=True)
        sitk.WriteImage(posed, str(args.out / "labelsTr" / case.label_path.name))
    source["training"] = [e for e in source.get("training", []) if Path(e["label"]).name[: -len(ds.file_ending)]
                          in ids]
    source["numTraining"] = len(ids)
    source["description"] = f"posed copies of {len(ids)} test cases of {args.dataset}: {__doc__.splitlines()[0]}"
    (args.out / "dataset.json").write_text(json.dumps(source, indent=1))
    cases = Path(args.dataset) / "cases.json"
    if cases.is_file():
        entries = [e for e in json.loads(cases.read_text()) if e["case"] in ids]
        (args.out / "cases.json").write_text(json.dumps(entries, indent=1))
    emit(stamped({"source": str(args.dataset), "model": meta.version, "cases": ids, "poses": poses}, "cpu"),
         args.out / "poses.json", indent=1)


if __name__ == "__main__":
    main()
