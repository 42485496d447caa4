"""Control for ISL's fine-tuning: the same per-case fine-tuning on the atlases as deformed toward the scan (the
method) and on the atlases left undeformed (zero displacement: the network's own training crops), on a bundle's
first validation cases. If the tuned network falls under its start either way, the fine-tuning recipe, not the
registration, is what pulls it down. Prints JSON (each arm as `validation_score.py` scores a variant).

    python benchmarks/finetune_control.py --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/finetune_control_headneck_ct.json

Setting: K 8, 20 fine-tuning steps, no re-registration, fusion weight 0.5, safety off, no mirror averaging, the
other fields at the ISLConfig defaults."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch
from validation_score import score_variant

from isl.align import Aligned, Aligner

CONFIG = dict(method="isl", atlases=8, finetune_steps=20, min_steps=20, fusion_weight=0.5, min_agreement=0.0,
              final_flips=False, mask_flips=False, reregister_steps=0)


def undeformed(self: Aligner, index, field, scan, mask, cfg) -> Aligned:
    """Aligner.optimise's stand-in: the selected atlases as they are (zero displacement)."""
    disp = torch.zeros((len(index), 3, *scan.shape[2:]), device=scan.device)
    return Aligned(index, torch.zeros_like(field), self.images[index].clone(), self.onehot[index].clone(), disp,
                   self.known[index])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--cases", type=int, default=3, help="the first N validation cases")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.defaults = True  # the control's setting starts from the ISLConfig defaults, as CONFIG says
    torch.set_num_threads(args.threads)
    meta = json.loads(open(f"{args.model}/bundle.json").read())
    ids = meta["refinement"]["validation_cases"][: args.cases]
    out = {"command": "python benchmarks/finetune_control.py " + shlex.join(sys.argv[1:]), "model": meta["version"],
           "validation_cases": ids, "deformed": score_variant(args, CONFIG, ids)}
    Aligner.optimise = undeformed
    out["undeformed"] = score_variant(args, CONFIG, ids)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
