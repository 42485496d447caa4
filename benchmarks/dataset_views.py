"""Views of a dataset for the benchmarks, written under a work folder outside the data (links where they can be, copies
where they must): a copy resampled to other voxels, one sequence of a multi-sequence dataset, a dataset without one
case. Prints the view's folder, so that a shell command can train on it:

    python -m benchmarks.dataset_views --dataset ../shared/data/brats_multiseq --resample 3 --sequence FLAIR \\
        --work scratch/views
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def resampled(dataset: str, mm: float, work: Path) -> str:
    """A copy of `dataset` on `mm` mm voxels (images linear, labels nearest), made once under `work`."""
    import shutil

    import SimpleITK as sitk

    src, dst = Path(dataset), work / f"{Path(dataset).name}_{mm:g}mm"
    if (dst / "dataset.json").is_file():
        return str(dst)
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / sub).glob("*.nii.gz")):
            image = sitk.ReadImage(str(path))
            size = [round(n * s / mm) for n, s in zip(image.GetSize(), image.GetSpacing())]
            mode = sitk.sitkNearestNeighbor if sub == "labelsTr" else sitk.sitkLinear
            out = sitk.Resample(image, size, sitk.Transform(), mode, image.GetOrigin(), (mm,) * 3,
                                image.GetDirection(), 0, image.GetPixelID())
            sitk.WriteImage(out, str(dst / sub / path.name))
    for name in ("dataset.json", "cases.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return str(dst)


def single_sequence(dataset: str, channel: int, work: Path) -> str:
    """A view of a multi-sequence dataset holding one sequence only (links, no copies)."""
    src = Path(dataset)
    meta = json.loads((src / "dataset.json").read_text())
    names = meta.get("channel_names") or meta.get("modality")
    name = names[str(channel)]
    dst = work / f"{src.name}_{name}"
    if (dst / "dataset.json").is_file():
        return str(dst)
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    for path in sorted((src / "imagesTr").glob(f"*_{channel:04d}.nii.gz")):
        (dst / "imagesTr" / path.name.replace(f"_{channel:04d}", "_0000")).symlink_to(path.resolve())
    (dst / "labelsTr").symlink_to((src / "labelsTr").resolve())
    meta = {k: v for k, v in meta.items() if k not in ("modality", "channel_names")} | {"channel_names": {"0": name}}
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return str(dst)


def leave_out(dataset: str, case_id: str, work: Path) -> str:
    """A view of `dataset` without `case_id` (links)."""
    src = Path(dataset)
    dst = work / f"{src.name}_without_{case_id}"
    if not (dst / "dataset.json").is_file():
        for sub in ("imagesTr", "labelsTr"):
            (dst / sub).mkdir(parents=True, exist_ok=True)
            for path in (src / sub).glob("*.nii.gz"):
                if not path.name.startswith(case_id + ".") and not path.name.startswith(case_id + "_"):
                    (dst / sub / path.name).symlink_to(path.resolve())
        (dst / "dataset.json").write_text((src / "dataset.json").read_text())
    return str(dst)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--resample", type=float, default=None, help="voxel size in mm of a resampled copy")
    ap.add_argument("--sequence", default=None, help="keep this sequence only (its name in dataset.json)")
    ap.add_argument("--work", default="scratch/views")
    args = ap.parse_args()
    work = Path(args.work)
    dataset = resampled(args.dataset, args.resample, work) if args.resample else args.dataset
    if args.sequence:
        meta = json.loads((Path(dataset) / "dataset.json").read_text())
        names = meta.get("channel_names") or meta.get("modality")
        channel = {v: int(k) for k, v in names.items()}.get(args.sequence)
        if channel is None:
            raise SystemExit(f"no sequence {args.sequence!r} in {dataset}; it has {list(names.values())}")
        dataset = single_sequence(dataset, channel, work)
    print(dataset)


if __name__ == "__main__":
    main()
