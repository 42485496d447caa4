"""Is the teacher or the recipe what keeps ISL's fine-tuned network under its start on a bundle? On its first
validation cases (never its test split), the control's setting (`finetune_control.CONFIG`: K 8, 20 steps, fusion
weight 0.5, safety off) is scored with two changes, each alone:

- a better teacher: the atlases aligned as the refinement does, then `--full-steps` more instance-optimisation
  steps on the full-resolution grid (the registration's `downsample` set to 1, as `atlas_bound.py` measures
  them), fine-tuned with Adam at 3e-4 (the default) and at 3e-5;
- a gentler recipe: plain SGD (momentum 0.9) in place of Adam, at 1e-3 and 1e-2, on the deformed atlases as the
  refinement aligns them and on the atlases left undeformed (the network's own training crops).

If neither the full-resolution atlases nor the gentler optimiser lift the tuned network over its start, the
missing gain is not in the registration's resolution. Prints JSON (each arm as `validation_score.py` scores a
variant: the starting mask, the fusion alone, the tuned network alone and the ISL mix).

    python benchmarks/finetune_teacher.py --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/finetune_teacher_headneck_ct.json
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys

import torch
from finetune_control import CONFIG, undeformed
from validation_score import score_variant

from isl.align import Aligned, Aligner
from isl.finetune import FineTuning
from registration.instance import instance_optimise

COARSE, INIT = Aligner.optimise, FineTuning.__init__


def full_resolution(steps: int, lr: float):
    """Aligner.optimise's stand-in: as configured, then `steps` more steps on the full-resolution grid."""

    def optimise(self: Aligner, index, field, scan, mask, cfg) -> Aligned:
        al = COARSE(self, index, field, scan, mask, cfg)
        full = copy.copy(self.reg)
        full.cfg = full.cfg.model_copy(update={"downsample": 1})
        fine = cfg.model_copy(update={"steps": steps, "lr": lr})
        u = instance_optimise(full, self.images[index, :1], self.onehot[index, 1:], scan, mask, al.displacement,
                              fine, al.known[:, 1:])
        with torch.no_grad():
            images, labels = full.warp(self.images[index], u), full.warp(self.onehot[index], u)
        return Aligned(index, al.field, images, labels, u, al.known)

    return optimise


def sgd(lr: float):
    """FineTuning.__init__'s stand-in: the same, with SGD (momentum 0.9) at `lr` in place of Adam."""

    def init(self, *a, **kw):
        INIT(self, *a, **kw)
        self.opt = torch.optim.SGD(self.network.parameters(), lr=lr, momentum=0.9)

    return init


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--cases", type=int, default=3, help="the first N validation cases")
    ap.add_argument("--full-steps", type=int, default=30)
    ap.add_argument("--full-lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.defaults = True
    torch.set_num_threads(args.threads)
    meta = json.loads(open(f"{args.model}/bundle.json").read())
    ids = meta["refinement"]["validation_cases"][: args.cases]
    arms = {}
    for name, optimise, init, over in [
        ("full_resolution_adam_3e-4", full_resolution(args.full_steps, args.full_lr), INIT, {}),
        ("full_resolution_adam_3e-5", full_resolution(args.full_steps, args.full_lr), INIT, {"finetune_lr": 3e-5}),
        ("sgd_1e-3_deformed", COARSE, sgd(1e-3), {}),
        ("sgd_1e-3_undeformed", undeformed, sgd(1e-3), {}),
        ("sgd_1e-2_deformed", COARSE, sgd(1e-2), {}),
        ("sgd_1e-2_undeformed", undeformed, sgd(1e-2), {}),
    ]:
        Aligner.optimise, FineTuning.__init__ = optimise, init
        arms[name] = score_variant(args, CONFIG | over, ids)
        print(name, json.dumps(arms[name]["mean_dice"]), file=sys.stderr, flush=True)
    Aligner.optimise, FineTuning.__init__ = COARSE, INIT
    summary = {name: arm["mean_dice"] for name, arm in arms.items()}
    print(json.dumps({"command": "python benchmarks/finetune_teacher.py " + shlex.join(sys.argv[1:]),
                      "model": meta["version"], "validation_cases": ids, "summary": summary, "arms": arms}, indent=1))


if __name__ == "__main__":
    main()
