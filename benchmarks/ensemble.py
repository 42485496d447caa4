"""Single network vs ensembles, each trained through `worker.training.train.train_bundle` as `isl train` trains it,
scored on cases none of them trained on. Prints JSON (and writes it, arm by arm, to --json: a run resumes).

k-fold ensembles on a test split:

    python benchmarks/ensemble.py folds --dataset ../shared/data/hippocampus --holdout 48 --test 20 --cases 20 \\
        --folds 5 --iterations 1000 --json benchmarks/results/ensemble_hippocampus.json

Sequences, leave one case out (every case is the test case of one round; each arm trains once per round):

    python benchmarks/ensemble.py sequences --dataset ../shared/data/brats_multiseq --resample 3 \\
        --iterations 600 --json benchmarks/results/ensemble_brats_multiseq.json

`sequences` arms: the multi-channel network, the per-sequence ensemble (mean and vote), and a network on each
sequence alone. --resample MM first writes a copy of the dataset resampled to MM mm voxels under --work (a benchmark's
shortcut on a CPU: 1 mm glioma volumes make a region of interest too large to train on here; the copy stays outside
the project). Every arm: fixed iterations, --validation 0 (the networks are compared; refinement is not configured)
and the baseline mask only unless --isl. Scored on the preprocessing's grid, over the labels each reference contours.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segmentation.dataset import load_case, load_dataset
from segmentation.metrics import dice
from worker.pipeline import load_refiner
from worker.training.train import BundleTrainConfig, train_bundle


def score(model_dir: Path, dataset: str, ids: list[str], isl: bool) -> dict:
    refiner = load_refiner(model_dir, dataset, {"device": "cpu"})
    ds, names = load_dataset(dataset), refiner.bundle.segmentation.labels
    rows = {}
    for case_id in ids:
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        labels = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
        x = refiner.pre.images(volumes)[0]
        truth = refiner.pre.label(label).astype(np.int64)
        res = refiner.refine(x) if isl else None
        base = res.baseline if isl else _baseline(refiner, x)
        rows[case_id] = {"baseline": _mean(base, truth, labels)} | (
            {"isl": _mean(res.probs, truth, labels)} if isl else {})
    return rows


def _baseline(refiner, x: np.ndarray) -> np.ndarray:
    from segmentation.infer import predict

    return predict(refiner.net, x, refiner.pre.patch_size, refiner.device, ())


def _mean(probs: np.ndarray, truth: np.ndarray, labels: list[int]) -> float:
    return round(float(np.mean(list(dice(probs.argmax(0), truth, labels).values()))), 5)


def train(args, dataset: str, out: Path, **fields) -> float:
    cfg = BundleTrainConfig(validation=0, name=out.name, **fields)
    cfg.training.iterations, cfg.registration.iterations = args.iterations, args.reg_iterations
    t0 = time.perf_counter()
    train_bundle(dataset, out, cfg, torch.device("cpu"), progress=lambda m: None)
    return round(time.perf_counter() - t0, 1)


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


def folds_arms(args, result: dict, save) -> None:
    ids = sorted(c.case_id for c in load_dataset(args.dataset).cases)
    test = ids[: args.holdout][: args.test]
    result["test_cases"] = test
    arms = {"single": {}, f"folds{args.folds}_mean": {"folds": args.folds},
            f"folds{args.folds}_vote": {"folds": args.folds, "combine": "vote"}}
    for arm, fields in arms.items():
        if arm in result["arms"]:
            continue
        out = Path(args.work) / arm
        seconds = train(args, args.dataset, out, holdout=args.holdout, cases=args.cases, **fields)
        result["arms"][arm] = {"train_seconds": seconds, "per_case": score(out, args.dataset, test, args.isl)}
        save(arm)


def sequences_arms(args, result: dict, save) -> None:
    dataset = resampled(args.dataset, args.resample, Path(args.work)) if args.resample else args.dataset
    ds = load_dataset(dataset)
    arms = {"multi_channel": (dataset, {}), "per_sequence_mean": (dataset, {"per_sequence": True}),
            "per_sequence_vote": (dataset, {"per_sequence": True, "combine": "vote"})}
    arms |= {f"only_{n}": (single_sequence(dataset, c, Path(args.work)), {}) for c, n in enumerate(ds.channel_names)}
    ids = sorted(c.case_id for c in ds.cases)
    for arm, (data, fields) in arms.items():
        rows = result["arms"].setdefault(arm, {"train_seconds": 0.0, "per_case": {}})
        for case_id in ids:
            if case_id in rows["per_case"]:
                continue
            out = Path(args.work) / f"{arm}_{case_id}"
            train_ds = _leave_out(data, case_id, Path(args.work))
            rows["train_seconds"] += train(args, train_ds, out, **fields)
            rows["per_case"] |= score(out, data, [case_id], args.isl)
            save(f"{arm} without {case_id}")


def _leave_out(dataset: str, case_id: str, work: Path) -> str:
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
    ap.add_argument("mode", choices=["folds", "sequences"])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--holdout", type=int, default=0)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--resample", type=float, default=None)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--reg-iterations", type=int, default=100)
    ap.add_argument("--isl", action="store_true", help="also ISL on top (ISLConfig defaults, unchecked)")
    ap.add_argument("--work", default="scratch/ensemble")
    ap.add_argument("--json", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    result |= {"command": "python benchmarks/ensemble.py " + shlex.join(sys.argv[1:]), "mode": args.mode,
               "iterations": args.iterations}

    def save(what: str) -> None:
        for arm in result["arms"].values():
            cases = arm["per_case"].values()
            arm["mean_dice"] = {m: round(float(np.mean([c[m] for c in cases])), 5) for m in next(iter(cases))}
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{what}: " + json.dumps({a: v["mean_dice"] for a, v in result["arms"].items()}), file=sys.stderr,
              flush=True)

    (folds_arms if args.mode == "folds" else sequences_arms)(args, result, save)
    print(json.dumps({k: v for k, v in result.items() if k != "arms"} | {
        "mean_dice": {a: v["mean_dice"] for a, v in result["arms"].items()}}, indent=1))


if __name__ == "__main__":
    main()
