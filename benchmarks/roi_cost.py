"""One region of interest for all organs, or one per organ? Voxel counts of each choice on a dataset's training
cases, by the fingerprint's own ROI rule (ceil8(1.15 x largest extent + 4) per axis), on the canonical grid.

    python -m benchmarks.roi_cost --dataset ../shared/data/headneck_ct --holdout 15 \
        --json benchmarks/results/roi_cost_headneck_ct.json
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import REQUIRED, add_options, emit, stamped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, dataset=REQUIRED)
    ap.add_argument("--holdout", type=int, default=0)
    add_options(ap, json=None)
    args = ap.parse_args(argv)
    from imaging.dataset import load_case, load_dataset
    from isl.training.plan import _ceil, fingerprint

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
    result = {"cases": len(ids), "canonical_spacing_mm": pre.spacing, "median_grid_voxels": grid,
              "one_roi": {"roi": pre.roi_size, "voxels": one, "share_of_grid": round(one / grid, 3)},
              "per_organ": per_organ, "per_organ_total_voxels": total,
              "per_organ_total_vs_one_roi": round(total / one, 3)}
    emit(stamped(result), args.json)


if __name__ == "__main__":
    main()
