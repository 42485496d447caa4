"""How good are the deformed atlases themselves, against the network they are meant to improve on? On a bundle's
first validation cases (never its test split): per case, the starting mask's organ-mean Dice in the ROI beside
the K selected atlases as the refinement aligns them (the learned field, instance-optimised on the registration's
coarse grid), scored three ways: the best single atlas per organ (an oracle no fusion can exceed per organ), the
mean single atlas, and their fusion; then the same atlases after `--full-steps` more instance-optimisation steps
on the full-resolution grid (the registration's `downsample` set to 1: `Aligner.full_resolution`, what
ISLConfig.full_resolution_steps runs), with the seconds those steps and their warps took.
`--full-steps` takes several counts, cumulative checkpoints of one run (Adam restarts at each). `--mix W ...`
also scores each fusion mixed with the starting mask, W * fusion + (1 - W) * start (ISL's final mix without
fine-tuning: `finetune_steps` 0). `--device cuda` runs it on a GPU. Prints JSON (and writes it with --json).

    python -m benchmarks.atlas_bound --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/atlas_bound_headneck_ct.json

Fusion here: the refinement's local-NCC weighting (beta 30, 5-voxel window) without the non-local search."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from benchmarks.common import REQUIRED, add_options, emit, stamped
from imaging.dataset import load_case, load_dataset
from imaging.metrics import dice
from isl.mask import initial_mask
from isl.refiner import load_refiner
from registration.fusion import fuse_labels
from registration.instance import InstanceConfig
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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, model=REQUIRED, dataset=REQUIRED, cases=3)
    ap.add_argument("--atlases", type=int, default=8)
    ap.add_argument("--full-steps", type=int, nargs="*", default=[30],
                    help="cumulative step counts at which the full-resolution atlases are scored (none: skip)")
    ap.add_argument("--global-alignment", choices=["none", "rigid", "similarity", "affine"], default=None,
                    help="the global stage before the registration (default: the bundle's configuration)")
    ap.add_argument("--stages", action="store_true",
                    help="also score the atlases after the global stage alone and under the network's field alone")
    ap.add_argument("--full-lr", type=float, default=0.1)
    ap.add_argument("--full-dice", type=float, default=None,
                    help="weak-supervision weight of the full-resolution steps (default: the bundle's)")
    ap.add_argument("--mix", type=float, nargs="*", default=[], help="fusion weights W to score W*fusion+(1-W)*start")
    add_options(ap, threads=2, device="cpu", json=None)
    return ap.parse_args(argv)


def score_case(refiner, ds, case_id: str, steps: list[int], fine: InstanceConfig, mix: list[float],
               stages: bool = False) -> dict:
    """One case: the starting mask, the atlases as the refinement aligns them (coarse), and the same atlases after
    each cumulative count of full-resolution steps, with the seconds of each. With `stages`, also the selected
    atlases as the global stage leaves them (`global_only`) and under the network's own field (`network_field`)."""
    cfg, pre, aligner, names = refiner.cfg, refiner.pre, refiner.aligner, refiner.bundle.segmentation.labels
    case = ds.case(case_id)
    volumes, label, _ = load_case(ds, case)
    organs = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
    start = initial_mask(refiner.net, pre.images(volumes)[0], pre, False, refiner.device)
    truth = crop(pre.label(label).astype(np.int64), start.center, pre.roi_size)
    t = time.perf_counter()
    aligner, _ = aligner.global_stage(start.scan, start.mask, cfg.affine)
    al = aligner.register(start.scan, start.mask, cfg.atlases, cfg.registration)
    coarse_s = time.perf_counter() - t
    scores = {"start": start.mask, "mix": mix}
    row = {"start": _mean(dice(start.mask.argmax(0), truth, organs)),
           "coarse": atlas_scores(al.labels, al.images[:, :1], al.known, start.scan, truth, organs, **scores)}
    if stages:  # the same atlases before the network's field, and with the network's field alone
        no_steps = cfg.registration.model_copy(update={"steps": 0})
        learned = aligner.register(start.scan, start.mask, cfg.atlases, no_steps)
        for name, a in (("global_only", aligner.undeformed(al)), ("network_field", learned)):
            row[name] = atlas_scores(a.labels, a.images[:, :1], a.known, start.scan, truth, organs, **scores)
    mask = torch.from_numpy(start.mask[1:])[None].to(refiner.device)
    current, done, spent, full_s = al, 0, 0.0, {}
    for n in steps:  # ISLConfig.full_resolution_steps' own optimisation, scored at each checkpoint
        t = time.perf_counter()
        current = aligner.full_resolution(current, start.scan, mask, fine.model_copy(update={"steps": n - done}))
        done, spent = n, spent + time.perf_counter() - t
        full_s[n] = round(spent, 1)
        key = "full_resolution" if len(steps) == 1 else f"full_resolution_{n}"
        row[key] = atlas_scores(current.labels, current.images[:, :1], al.known, start.scan, truth, organs, **scores)
    row["seconds"] = {"registration_as_configured": round(coarse_s, 1)}
    if steps:
        row["seconds"]["full_resolution_steps"] = full_s[steps[0]] if len(steps) == 1 else full_s
    return row


def summarise(rows: dict, steps: list[int], mix: list[float]) -> dict:
    """Per grid (coarse, each full-resolution checkpoint), each score's mean over the cases."""
    summary = {"start": _mean({c: r["start"] for c, r in rows.items()})}
    grids = ["coarse"] + (["full_resolution"] if len(steps) == 1 else [f"full_resolution_{n}" for n in steps])
    grids += [g for g in ("global_only", "network_field") if g in next(iter(rows.values()))]
    for grid in grids:
        keys = ["best_atlas", "mean_atlas", "fusion"] + [f"mix_{w:g}" for w in mix]
        summary[grid] = {k: _mean({c: r[grid][k] for c, r in rows.items()}) for k in keys}
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    overrides = {"method": "isl", "atlases": args.atlases, "device": args.device}
    if args.global_alignment:
        overrides["affine"] = {"kind": args.global_alignment}
    refiner = load_refiner(args.model, args.dataset, overrides)
    cfg, names = refiner.cfg, refiner.bundle.segmentation.labels
    steps = sorted(set(args.full_steps))
    fine = cfg.registration.model_copy(update={"lr": args.full_lr} | (
        {"w_dice": args.full_dice} if args.full_dice is not None else {}))
    ds = load_dataset(args.dataset)
    rows = {}
    for case_id in refiner.bundle.meta["refinement"]["validation_cases"][: args.cases]:
        rows[case_id] = score_case(refiner, ds, case_id, steps, fine, args.mix, args.stages)
        print(case_id, json.dumps(rows[case_id]), file=sys.stderr, flush=True)
    emit(stamped({"model": refiner.bundle.version, "atlases": args.atlases, "device": str(refiner.device),
                  "global_alignment": cfg.affine.model_dump(), "registration": cfg.registration.model_dump(),
                  "full_resolution_steps": fine.model_dump(exclude={"steps"}) | {"steps": steps},
                  "labels": {int(k): v for k, v in names.items()},
                  "summary": summarise(rows, steps, args.mix), "per_case": rows}, refiner.device), args.json, indent=1)


if __name__ == "__main__":
    main()
