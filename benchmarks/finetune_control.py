"""Control for ISL's fine-tuning: the same per-case fine-tuning on the atlases as deformed toward the scan (the
method) and on the atlases left undeformed (`ISLConfig.atlas_alignment` "undeformed": zero displacement, the
network's own training crops), on a bundle's first validation cases. If the tuned network falls under its start
either way, the fine-tuning recipe, not the registration, is what pulls it down. Prints JSON (each arm as
`validation_score` scores a variant; written with --json too).

    python -m benchmarks.finetune_control --model models/headneck_ct --dataset ../shared/data/headneck_ct --cases 3 \\
        > benchmarks/results/finetune_control_headneck_ct.json

Setting: K 8, 20 fine-tuning steps, no re-registration, fusion weight 0.5, safety off, no mirror averaging, the
other fields at the ISLConfig defaults."""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import REQUIRED, add_options, emit, stamped
from benchmarks.validation_score import score_variant, validation_cases

CONFIG = dict(method="isl", atlases=8, finetune_steps=20, min_steps=20, fusion_weight=0.5, min_agreement=0.0,
              final_flips=False, mask_flips=False, reregister_steps=0)
UNDEFORMED = {"atlas_alignment": "undeformed"}


def parse(argv: list[str] | None = None, **extra) -> argparse.Namespace:
    """The options of the fine-tuning experiments on a bundle's validation cases (`extra`: name -> (type, default,
    help) of each further option); every variant starts from the ISLConfig defaults."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, model=REQUIRED, dataset=REQUIRED, cases=3)
    for name, (kind, default, text) in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    add_options(ap, threads=2, device="cpu", json=None)
    args = ap.parse_args(argv)
    args.defaults = True  # the control's setting starts from the ISLConfig defaults, as CONFIG says
    torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    meta, ids = validation_cases(args.model, args.cases)
    emit(stamped({"model": meta["version"], "validation_cases": ids,
                  "deformed": score_variant(args, CONFIG, ids),
                  "undeformed": score_variant(args, CONFIG | UNDEFORMED, ids)}, args.device), args.json, indent=1)


if __name__ == "__main__":
    main()
