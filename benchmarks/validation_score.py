"""Score refinement configs on a bundle's own validation cases (those its configuration searched on), to set a
hand-made setting beside the configuration's choice without touching the test split; with the Dice of ISL's
parts (the starting mask, the fusion alone, the tuned network alone, the registered atlases' majority vote)
beside the final mix. Prints JSON (and
writes it with --json).

    python -m benchmarks.validation_score --model models/hippocampus_few --dataset ../shared/data/hippocampus \\
        --defaults --config '{"final_inference": "roi"}' \\
        > benchmarks/results/defaults_on_validation_hippocampus_few.json

--defaults starts every config from the ISLConfig defaults (the hand-set settings); without it, from the bundle's
configured settings. Each --config (repeatable, JSON) is one variant: fields overridden on top. --cases N scores
the first N validation cases only; --device cuda runs them on a GPU."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REQUIRED, add_options, emit, stamped
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
            probs["majority_vote"] = result.atlas_vote
        rows[case_id] = {k: _mean_dice(v, truth, labels) for k, v in probs.items()}
    means = {k: round(float(np.mean([r[k] for r in rows.values()])), 5) for k in next(iter(rows.values()))}
    return {"overrides": over, "config": refiner.cfg.model_dump(mode="json"), "mean_dice": means,
            "per_case": rows, "seconds": round(time.perf_counter() - t, 1)}


def _mean_dice(probs: np.ndarray, truth: np.ndarray, labels: list[int]) -> float:
    return round(float(np.mean(list(dice(probs.argmax(0), truth, labels).values()))), 5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, model=REQUIRED, dataset=REQUIRED)
    ap.add_argument("--config", action="append", help="ISLConfig fields to override, as JSON (repeatable: variants)")
    ap.add_argument("--defaults", action="store_true", help="start from the ISLConfig defaults, not the bundle's")
    ap.add_argument("--cases", type=int, default=0, help="the first N validation cases only (0: all)")
    add_options(ap, threads=2, device="cpu", json=None)
    ap.add_argument("--progress", default=None, help="a file that gets each variant's result as one JSON line when "
                                                     "it ends (what a run stopped by a time limit still keeps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta, ids = validation_cases(args.model, args.cases)
    variants = []
    for c in args.config or ["{}"]:
        variants.append(score_variant(args, json.loads(c), ids))
        if args.progress:
            with open(args.progress, "a") as f:
                f.write(json.dumps(variants[-1]) + "\n")
    emit(stamped({"model": meta["version"], "validation_cases": ids, "from_defaults": args.defaults,
                  "variants": variants}, args.device), args.json, indent=1)


def validation_cases(model: str, first: int) -> tuple[dict, list[str]]:
    """A bundle's metadata and its first `first` validation cases (0: all), those its configuration searched on."""
    meta = json.loads((Path(model) / "bundle.json").read_text())
    return meta, meta["refinement"]["validation_cases"][: first or None]


if __name__ == "__main__":
    main()
