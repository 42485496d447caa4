"""How good are the deformed atlases themselves, against the network they are meant to improve on? On a bundle's
first validation cases (never its test split): per case, the starting mask's organ-mean Dice in the ROI beside
the K selected atlases as the refinement aligns them (the learned field, instance-optimised on the registration's
coarse grid), scored three ways: the best single atlas per organ (an oracle no fusion can exceed per organ), the
mean single atlas, and their fusion; then the same atlases after `--full-steps` more instance-optimisation steps
on the full-resolution grid (the registration's `downsample` set to 1), with the seconds those steps took.
`--full-steps` takes several counts, cumulative checkpoints of one run (Adam restarts at each). `--mix W ...`
also scores each fusion mixed with the starting mask, W * fusion + (1 - W) * start (ISL's final mix without
fine-tuning: `finetune_steps` 0). `--device cuda` runs it on a GPU. Prints JSON.

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

from imaging.dataset import load_case, load_dataset
from imaging.metrics import dice
from isl.mask import initial_mask
from isl.refiner import load_refiner
from registration.fusion import fuse_labels
from registration.instance import instance_optimise
from segmentation.preprocess import crop


def atlas_scores(labels: torch.Tensor, images: torch.Tensor, known: torch.Tensor, scan: torch.Tensor,
                 truth: np.ndarray, organs: list[int], start: np.ndarray, mix: list[float]) -> dict:
    """Best single atlas per organ, mean single atlas and fusion (organ-mean Dice) of warped one-hot labels, and
    the fusion mixed with the starting probabilities `start` (L, ...) at each weight of `mix`."""
    per = [dice(lab.argmax(0).cpu().numpy(), truth, [v for v in organs if known[k][v]]) for k, lab in enumerate(labels)]
    drawn = [v for v in organs if any(v in p for p in per)]  # organs that at least one of the atlases contours
    best = {v: max(p[v] for p in per if v in p) for v in drawn}
    mean = {v: float(np.mean([p[v] for p in per if v in p])) for v in drawn}
    lab = labels.clone()
    lab[:, 0] += 1.0 - lab.sum(1)  # what left the atlas grid is background
    fused = fuse_labels(images, lab, scan, 30.0, 5, 0, known).cpu().numpy()
    out = {"best_atlas": _mean(best), "mean_atlas": _mean(mean),
           "fusion": _mean(dice(fused.argmax(0), truth, organs)), "best_atlas_per_organ": _round(best)}
    for w in mix:
        out[f"mix_{w:g}"] = _mean(dice((w * fused + (1 - w) * start).argmax(0), truth, organs))
    return out


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
    ap.add_argument("--full-steps", type=int, nargs="+", default=[30],
                    help="cumulative step counts at which the full-resolution atlases are scored")
    ap.add_argument("--full-lr", type=float, default=0.1)
    ap.add_argument("--full-dice", type=float, default=None,
                    help="weak-supervision weight of the full-resolution steps (default: the bundle's)")
    ap.add_argument("--mix", type=float, nargs="*", default=[], help="fusion weights W to score W*fusion+(1-W)*start")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    refiner = load_refiner(args.model, args.dataset, {"method": "isl", "atlases": args.atlases,
                                                      "device": args.device})
    device = refiner.device
    cfg, pre, aligner, names = refiner.cfg, refiner.pre, refiner.aligner, refiner.bundle.segmentation.labels
    full = copy.copy(aligner.reg)
    full.cfg = full.cfg.model_copy(update={"downsample": 1})
    steps = sorted(set(args.full_steps))
    fine = cfg.registration.model_copy(update={"lr": args.full_lr} | (
        {"w_dice": args.full_dice} if args.full_dice is not None else {}))
    ds = load_dataset(args.dataset)
    ids = refiner.bundle.meta["refinement"]["validation_cases"][: args.cases]
    rows = {}
    for case_id in ids:
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        organs = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
        start = initial_mask(refiner.net, pre.images(volumes)[0], pre, False, device)
        truth = crop(pre.label(label).astype(np.int64), start.center, pre.roi_size)
        t = time.perf_counter()
        al = aligner.register(start.scan, start.mask, cfg.atlases, cfg.registration)
        coarse_s = time.perf_counter() - t
        scores = {"start": start.mask, "mix": args.mix}
        row = {"start": _mean(dice(start.mask.argmax(0), truth, organs)),
               "coarse": atlas_scores(al.labels, al.images[:, :1], al.known, start.scan, truth, organs, **scores)}
        u, done, spent, full_s = al.displacement, 0, 0.0, {}
        mask = torch.from_numpy(start.mask[1:])[None].to(device)
        for n in steps:
            t = time.perf_counter()
            u = instance_optimise(full, aligner.images[al.index, :1], aligner.onehot[al.index, 1:], start.scan,
                                  mask, u, fine.model_copy(update={"steps": n - done}), al.known[:, 1:])
            done, spent = n, spent + time.perf_counter() - t
            full_s[n] = round(spent, 1)
            with torch.no_grad():
                labels, images = full.warp(aligner.onehot[al.index], u), full.warp(aligner.images[al.index, :1], u)
            key = "full_resolution" if len(steps) == 1 else f"full_resolution_{n}"
            row[key] = atlas_scores(labels, images, al.known, start.scan, truth, organs, **scores)
        row["seconds"] = {"registration_as_configured": round(coarse_s, 1),
                          "full_resolution_steps": full_s[steps[0]] if len(steps) == 1 else full_s}
        rows[case_id] = row
        print(case_id, json.dumps(row), file=sys.stderr, flush=True)
    summary = {"start": _mean({c: r["start"] for c, r in rows.items()})}
    grids = ["coarse"] + (["full_resolution"] if len(steps) == 1 else [f"full_resolution_{n}" for n in steps])
    for grid in grids:
        keys = ["best_atlas", "mean_atlas", "fusion"] + [f"mix_{w:g}" for w in args.mix]
        summary[grid] = {k: _mean({c: r[grid][k] for c, r in rows.items()}) for k in keys}
    print(json.dumps({"command": "python benchmarks/atlas_bound.py " + shlex.join(sys.argv[1:]),
                      "model": refiner.bundle.version, "atlases": args.atlases, "device": str(device),
                      "registration": cfg.registration.model_dump(),
                      "full_resolution_steps": fine.model_dump(exclude={"steps"}) | {"steps": steps},
                      "labels": {int(k): v for k, v in names.items()},
                      "summary": summary, "per_case": rows}, indent=1))


if __name__ == "__main__":
    main()
