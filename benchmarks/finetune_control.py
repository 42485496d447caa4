"""Control for ISL's fine-tuning: the same per-case fine-tuning on the atlases as deformed toward the scan (the
method) and on the atlases left undeformed (zero displacement: the network's own training crops), on a bundle's
first validation cases. If the tuned network falls under its start either way, the fine-tuning recipe, not the
registration, is what pulls it down. Prints JSON.

    python benchmarks/finetune_control.py --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/finetune_control_headneck_ct.json

Setting: K 8, 20 fine-tuning steps, no re-registration, fusion weight 0.5, safety off, no mirror averaging, the
other fields at the ISLConfig defaults."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import numpy as np
import torch

from segmentation.dataset import load_case, load_dataset
from segmentation.metrics import dice
from worker.method.align import Aligned, Aligner
from worker.method.config import ISLConfig
from worker.pipeline import load_refiner

CONFIG = dict(device="cpu", method="isl", atlases=8, finetune_steps=20, min_steps=20, fusion_weight=0.5,
              min_agreement=0.0, final_flips=False, mask_flips=False, reregister_steps=0)


def undeformed(self: Aligner, index, field, scan, mask, cfg) -> Aligned:
    """Aligner.optimise's stand-in: the selected atlases as they are (zero displacement)."""
    disp = torch.zeros((len(index), 3, *scan.shape[2:]), device=scan.device)
    return Aligned(index, torch.zeros_like(field), self.images[index].clone(), self.onehot[index].clone(), disp,
                   self.known[index])


def run(args, ids: list[str]) -> dict:
    refiner = load_refiner(args.model, args.dataset, ISLConfig(**CONFIG))
    ds, names = load_dataset(args.dataset), refiner.bundle.segmentation.labels
    rows = {}
    for case_id in ids:
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        labels = [v for v, known in zip(names, case.present(names)) if v and known]
        result = refiner.refine(refiner.pre.images(volumes)[0])
        truth = refiner.pre.label(label).astype(np.int64)
        parts = {"start": result.start, "tuned_network": result.part_on_grid("network"),
                 "fusion": result.part_on_grid("atlas")}
        rows[case_id] = {k: round(float(np.mean(list(dice(p.argmax(0), truth, labels).values()))), 5)
                         for k, p in parts.items()}
    return {"mean_dice": {k: round(float(np.mean([r[k] for r in rows.values()])), 5) for k in parts},
            "per_case": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = json.loads(open(f"{args.model}/bundle.json").read())
    ids = meta["refinement"]["validation_cases"][: args.cases]
    out = {"command": "python benchmarks/finetune_control.py " + shlex.join(sys.argv[1:]), "model": meta["version"],
           "validation_cases": ids, "config": CONFIG, "deformed": run(args, ids)}
    Aligner.optimise = undeformed
    out["undeformed"] = run(args, ids)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
