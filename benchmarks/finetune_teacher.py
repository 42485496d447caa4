"""Is the teacher or the recipe what keeps ISL's fine-tuned network under its start on a bundle? On its first
validation cases (never its test split), the control's setting (`finetune_control.CONFIG`: K 8, 20 steps, fusion
weight 0.5, safety off) is scored with two changes, each alone, each an ISLConfig field:

- a better teacher: the atlases aligned as the refinement does, then `--full-steps` more instance-optimisation
  steps on the full-resolution grid (`full_resolution_steps`, `full_resolution_lr`: the registration's
  `downsample` set to 1, as `atlas_bound` measures them), fine-tuned with Adam at 3e-4 (the default) and at 3e-5;
- a gentler recipe: plain SGD (momentum 0.9; `finetune_optimizer` "sgd") in place of Adam, at 1e-3 and 1e-2, on
  the deformed atlases as the refinement aligns them and on the atlases left undeformed (`atlas_alignment`
  "undeformed": the network's own training crops).

If neither the full-resolution atlases nor the gentler optimiser lift the tuned network over its start, the
missing gain is not in the registration's resolution. Prints JSON (each arm as `validation_score` scores a
variant: the starting mask, the fusion alone, the tuned network alone and the ISL mix; written with --json too).

    python -m benchmarks.finetune_teacher --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/finetune_teacher_headneck_ct.json
"""
from __future__ import annotations

import json
import sys

from benchmarks.common import emit, stamped
from benchmarks.finetune_control import CONFIG, UNDEFORMED, parse
from benchmarks.validation_score import score_variant, validation_cases


def arms(full_steps: int, full_lr: float) -> dict[str, dict]:
    """Each arm's ISLConfig fields on top of the control's setting."""
    full = {"full_resolution_steps": full_steps, "full_resolution_lr": full_lr}
    out = {"full_resolution_adam_3e-4": full, "full_resolution_adam_3e-5": full | {"finetune_lr": 3e-5}}
    for lr in ("1e-3", "1e-2"):
        sgd = {"finetune_optimizer": "sgd", "finetune_lr": float(lr)}
        out |= {f"sgd_{lr}_deformed": sgd, f"sgd_{lr}_undeformed": sgd | UNDEFORMED}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv, full_steps=(int, 30, "ISLConfig.full_resolution_steps of the full-resolution arms"),
                 full_lr=(float, 0.1, "ISLConfig.full_resolution_lr of those arms"))
    meta, ids = validation_cases(args.model, args.cases)
    scored = {}
    for name, over in arms(args.full_steps, args.full_lr).items():
        scored[name] = score_variant(args, CONFIG | over, ids)
        print(name, json.dumps(scored[name]["mean_dice"]), file=sys.stderr, flush=True)
    summary = {name: arm["mean_dice"] for name, arm in scored.items()}
    emit(stamped({"model": meta["version"], "validation_cases": ids, "summary": summary, "arms": scored},
                 args.device), args.json, indent=1)


if __name__ == "__main__":
    main()
