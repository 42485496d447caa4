"""Score refinement configs on a bundle's own validation cases (those its configuration searched on), to set a
hand-made setting beside the configuration's choice without touching the test split; with the Dice of ISL's
parts (the starting mask, the fusion alone, the tuned network alone) beside the final mix. Prints JSON.

    python benchmarks/validation_score.py --model models/hippocampus_few --dataset ../shared/data/hippocampus \\
        --defaults --config '{"final_inference": "roi"}' \\
        > benchmarks/results/defaults_on_validation_hippocampus_few.json

--defaults starts every config from the ISLConfig defaults (the hand-set settings); without it, from the bundle's
configured settings. Each --config (repeatable, JSON) is one variant: fields overridden on top. --cases N scores
the first N validation cases only; --device cuda runs them on a GPU."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import numpy as np
import torch

from imaging.dataset import load_case, load_dataset
from imaging.metrics import dice
from isl.config import ISLConfig
from isl.refiner import load_refiner

PARTS = {"start": None, "fusion_only": "atlas", "network_only": "network"}


def score_variant(args, over: dict, ids: list[str]) -> dict:
    over = over | {"device": args.device}
    refiner = load_refiner(args.model, args.dataset, ISLConfig(**over) if args.defaults else over)
    ds, names = load_dataset(args.dataset), refiner.bundle.segmentation.labels
    rows, t = {}, time.perf_counter()
    for case_id in ids:  # scored as the configuration scores: on the canonical grid, over the contoured labels
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        labels = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
        result = refiner.refine(refiner.pre.images(volumes)[0])
        truth = refiner.pre.label(label).astype(np.int64)

        probs = {"isl": result.probs}
        if result.parts:  # an ISL run (not a bundle that returns the network's own mask)
            probs |= {k: result.start if p is None else result.part_on_grid(p) for k, p in PARTS.items()}
        rows[case_id] = {k: _mean_dice(v, truth, labels) for k, v in probs.items()}
    means = {k: round(float(np.mean([r[k] for r in rows.values()])), 5) for k in next(iter(rows.values()))}
    return {"overrides": over, "config": refiner.cfg.model_dump(mode="json"), "mean_dice": means,
            "per_case": rows, "seconds": round(time.perf_counter() - t, 1)}


def _mean_dice(probs: np.ndarray, truth: np.ndarray, labels: list[int]) -> float:
    return round(float(np.mean(list(dice(probs.argmax(0), truth, labels).values()))), 5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--config", action="append", help="ISLConfig fields to override, as JSON (repeatable: variants)")
    ap.add_argument("--defaults", action="store_true", help="start from the ISLConfig defaults, not the bundle's")
    ap.add_argument("--cases", type=int, default=0, help="the first N validation cases only (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--progress", default=None, help="a file that gets each variant's result as one JSON line when "
                                                     "it ends (what a run stopped by a time limit still keeps)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = json.loads(open(f"{args.model}/bundle.json").read())
    ids = meta["refinement"]["validation_cases"][: args.cases or None]
    variants = []
    for c in args.config or ["{}"]:
        variants.append(score_variant(args, json.loads(c), ids))
        if args.progress:
            with open(args.progress, "a") as f:
                f.write(json.dumps(variants[-1]) + "\n")
    print(json.dumps({"command": "python benchmarks/validation_score.py " + shlex.join(sys.argv[1:]),
                      "model": meta["version"], "validation_cases": ids, "from_defaults": args.defaults,
                      "variants": variants}, indent=1))


if __name__ == "__main__":
    main()
