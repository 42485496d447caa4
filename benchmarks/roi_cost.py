"""One region of interest for all organs, or one per organ? Voxel counts of each choice on a dataset's training
cases, by the fingerprint's own ROI rule (ceil8(1.15 x largest extent + 4) per axis), on the canonical grid.

    python benchmarks/roi_cost.py --dataset ../shared/data/headneck_ct --holdout 15 \
        --json benchmarks/results/roi_cost_headneck_ct.json
"""
import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--holdout", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    from imaging.dataset import load_case, load_dataset
    from isl.training.train import _ceil, fingerprint

    ds = load_dataset(args.dataset)
    ids = sorted(c.case_id for c in ds.cases)[args.holdout:]
    loaded = [load_case(ds, ds.case(i)) for i in ids]
    pre = fingerprint(ds, [v for v, _, _ in loaded], [lab for _, lab, _ in loaded])
    labels = [pre.label(lab) for _, lab, _ in loaded]
    grid = int(np.median([np.prod(a.shape) for a in labels]))
    per_organ = {}
    for value, name in ds.foreground.items():
        extents = [np.ptp(np.argwhere(a == value), 0) + 1 for a in labels if (a == value).any()]
        box = tuple(max(16, _ceil(e * 1.15 + 4, 8)) for e in np.max(extents, 0))
        per_organ[name] = {"roi": box, "voxels": int(np.prod(box))}
    one = int(np.prod(pre.roi_size))
    total = sum(v["voxels"] for v in per_organ.values())
    result = {"command": f"python benchmarks/roi_cost.py --dataset {args.dataset} --holdout {args.holdout}",
              "cases": len(ids), "canonical_spacing_mm": pre.spacing, "median_grid_voxels": grid,
              "one_roi": {"roi": pre.roi_size, "voxels": one, "share_of_grid": round(one / grid, 3)},
              "per_organ": per_organ, "per_organ_total_voxels": total,
              "per_organ_total_vs_one_roi": round(total / one, 3)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
