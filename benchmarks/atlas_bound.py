"""How good are the deformed atlases themselves, against the network they are meant to improve on? On a bundle's
first validation cases (never its test split): per case, the starting mask's organ-mean Dice in the ROI beside
the K selected atlases as the refinement aligns them (the learned field, instance-optimised on the registration's
coarse grid), scored three ways: the best single atlas per organ (an oracle no fusion can exceed per organ), the
mean single atlas, and their fusion; then the same atlases after `--full-steps` more instance-optimisation steps
on the full-resolution grid (the registration's `downsample` set to 1), with the seconds those steps took.
Prints JSON.

    python benchmarks/atlas_bound.py --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/atlas_bound_headneck_ct.json

Fusion here: the refinement's local-NCC weighting (beta 30, 5-voxel window) without the non-local search."""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time

import numpy as np
import torch

from registration.fusion import fuse_labels
from registration.instance import instance_optimise
from segmentation.dataset import load_case, load_dataset
from segmentation.metrics import dice
from segmentation.preprocess import crop
from worker.method.mask import initial_mask
from worker.pipeline import load_refiner


def atlas_scores(labels: torch.Tensor, images: torch.Tensor, known: torch.Tensor, scan: torch.Tensor,
                 truth: np.ndarray, organs: list[int]) -> dict:
    """Best single atlas per organ, mean single atlas and fusion (organ-mean Dice) of warped one-hot labels."""
    per = [dice(lab.argmax(0).cpu().numpy(), truth, [v for v in organs if known[k][v]]) for k, lab in enumerate(labels)]
    best = {v: max(p[v] for p in per if v in p) for v in organs}
    mean = {v: float(np.mean([p[v] for p in per if v in p])) for v in organs}
    lab = labels.clone()
    lab[:, 0] += 1.0 - lab.sum(1)  # what left the atlas grid is background
    fused = fuse_labels(images, lab, scan, 30.0, 5, 0, known).cpu().numpy()
    return {"best_atlas": _mean(best), "mean_atlas": _mean(mean),
            "fusion": _mean(dice(fused.argmax(0), truth, organs)), "best_atlas_per_organ": _round(best)}


def _mean(scores: dict) -> float:
    return round(float(np.mean(list(scores.values()))), 4)


def _round(scores: dict) -> dict:
    return {int(k): round(float(v), 4) for k, v in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--atlases", type=int, default=8)
    ap.add_argument("--full-steps", type=int, default=30)
    ap.add_argument("--full-lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    refiner = load_refiner(args.model, args.dataset, {"method": "isl", "atlases": args.atlases, "device": "cpu"})
    cfg, pre, aligner, names = refiner.cfg, refiner.pre, refiner.aligner, refiner.bundle.segmentation.labels
    full = copy.copy(aligner.reg)
    full.cfg = full.cfg.model_copy(update={"downsample": 1})
    fine = cfg.registration.model_copy(update={"steps": args.full_steps, "lr": args.full_lr})
    ds = load_dataset(args.dataset)
    ids = refiner.bundle.meta["refinement"]["validation_cases"][: args.cases]
    rows = {}
    for case_id in ids:
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        organs = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
        start = initial_mask(refiner.net, pre.images(volumes)[0], pre, False, torch.device("cpu"))
        truth = crop(pre.label(label).astype(np.int64), start.center, pre.roi_size)
        t = time.perf_counter()
        al = aligner.register(start.scan, start.mask, cfg.atlases, cfg.registration)
        coarse_s = time.perf_counter() - t
        row = {"start": _mean(dice(start.mask.argmax(0), truth, organs)),
               "coarse": atlas_scores(al.labels, al.images[:, :1], al.known, start.scan, truth, organs)}
        t = time.perf_counter()
        u = instance_optimise(full, aligner.images[al.index, :1], aligner.onehot[al.index, 1:], start.scan,
                              torch.from_numpy(start.mask[1:])[None], al.displacement, fine, al.known[:, 1:])
        full_s = time.perf_counter() - t
        with torch.no_grad():
            labels, images = full.warp(aligner.onehot[al.index], u), full.warp(aligner.images[al.index, :1], u)
        row["full_resolution"] = atlas_scores(labels, images, al.known, start.scan, truth, organs)
        row["seconds"] = {"registration_as_configured": round(coarse_s, 1), "full_resolution_steps": round(full_s, 1)}
        rows[case_id] = row
        print(case_id, json.dumps(row), file=sys.stderr, flush=True)
    summary = {"start": _mean({c: r["start"] for c, r in rows.items()})}
    for grid in ("coarse", "full_resolution"):
        summary[grid] = {k: _mean({c: r[grid][k] for c, r in rows.items()})
                         for k in ("best_atlas", "mean_atlas", "fusion")}
    print(json.dumps({"command": "python benchmarks/atlas_bound.py " + shlex.join(sys.argv[1:]),
                      "model": refiner.bundle.version, "atlases": args.atlases,
                      "registration": cfg.registration.model_dump(),
                      "full_resolution_steps": fine.model_dump(), "labels": {int(k): v for k, v in names.items()},
                      "summary": summary, "per_case": rows}, indent=1))


if __name__ == "__main__":
    main()
