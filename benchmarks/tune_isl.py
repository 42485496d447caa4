"""Compare ISL configurations on a development split (never the test split) and print JSON (and write it with
--json).

    python -m benchmarks.tune_isl --model models/hippocampus_few --dataset ../shared/data/hippocampus \
        --first 68 --count 12 --configs '[{}, {"fusion_weight": 0.5}]'

Cases are the `count` cases from sorted position `first` on that the model did not train on; for the
hippocampus bundles, positions 68-159 are neither test cases (0-47) nor hippocampus_few's training cases.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import REQUIRED, add_options, emit, stamped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, model=REQUIRED, dataset=REQUIRED)
    ap.add_argument("--first", type=int, default=68)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--configs", default="[{}]", help="JSON list of ISLConfig overrides")
    add_options(ap, json=None)
    args = ap.parse_args(argv)

    from imaging.dataset import load_case, load_dataset
    from imaging.metrics import mean_dice
    from isl.config import ISLConfig
    from isl.refiner import load_refiner
    from segmentation.infer import predict
    from segmentation.preprocess import paste

    ds = load_dataset(args.dataset)
    refiner = load_refiner(args.model, args.dataset, ISLConfig(device="cpu"))
    used = set(refiner.bundle.meta["train_cases"]) | set(refiner.bundle.meta["atlases"])
    ids = [c for c in sorted(c.case_id for c in ds.cases)[args.first:] if c not in used][: args.count]
    fg = [v for v in refiner.bundle.segmentation.labels if v]
    cases = []
    for case_id in ids:
        vols, lab, _ = load_case(ds, ds.case(case_id))
        x, _ = refiner.pre.images(vols)
        cases.append((x, refiner.pre.label(lab)))

    def score(p, y):
        return mean_dice(p.argmax(0), y, fg)

    def peer(flips):
        return np.mean([score(predict(refiner.net, x, refiner.pre.patch_size, refiner.device,
                                      refiner.pre.mirror_axes if flips else False), y)
                        for x, y in cases])

    out = {"model": refiner.bundle.version, "cases": ids, "baseline": peer(False), "tta_flip": peer(True),
           "configs": []}
    print(json.dumps({k: out[k] for k in ("baseline", "tta_flip")}, default=float), flush=True)
    weights = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    for overrides in json.loads(args.configs):
        refiner.cfg = ISLConfig(device="cpu", **overrides)
        t0 = time.perf_counter()
        results = [refiner.refine(x) for x, _ in cases]
        seconds = (time.perf_counter() - t0) / len(cases)
        row = {"overrides": overrides, "isl": np.mean([score(r.probs, y) for r, (_, y) in zip(results, cases)]),
               "atlas_vote": np.mean([score(r.atlas_vote, y) for r, (_, y) in zip(results, cases)]),
               "seconds_per_case": round(seconds, 2)}
        # the final mix, recomputed offline: (1 - w) * {ema | network | start mask | mean of both} + w * atlas fusion
        for r in results:
            r.parts["network+start"] = 0.5 * (r.parts["network"] + r.parts["baseline"])
        for source in ("ema", "network", "baseline", "network+start"):
            row[f"mix_{source}"] = {w: round(float(np.mean([
                score(paste(r.baseline.copy(), (1 - w) * r.parts[source] + w * r.parts["atlas"], r.center), y)
                for r, (_, y) in zip(results, cases)])), 5) for w in weights}
        out["configs"].append(row)
        print(json.dumps(row, default=float), flush=True)
    emit(stamped(out), args.json, default=float)


if __name__ == "__main__":
    main()
