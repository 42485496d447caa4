"""Compare two `isl evaluate` results (e.g. the committed one and a rerun after a refactor) and print JSON:
each summary figure side by side with whether it agrees to 4 decimals (p-values to 4 significant digits),
whether every per-case Dice, HD95 and QA figure is identical, and the timings (which are expected to move).

    python -m benchmarks.compare_evaluations models/hippocampus_few/evaluation.json /tmp/few.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import add_options, emit, stamped

TIMINGS = ("median_seconds_isl_per_case", "median_seconds_isl_full_run_per_case", "median_stage_seconds", "peak_rss_mb")
QA = ("folding_fraction", "finetune_steps", "ema_changes", "atlases_used", "baseline_vs_refined_dice")


def agree(key: str, a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, dict) or isinstance(b, dict):  # per-label tables, the configuration: every entry agrees
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            agree(key, a[k], b[k]) for k in a)
    if isinstance(a, (str, bool, list)) or isinstance(b, (str, bool, list)):
        return a == b
    if key.startswith("wilcoxon"):
        return f"{a:.4g}" == f"{b:.4g}"
    return round(a, 4) == round(b, 4)


def compare(old: dict, new: dict) -> dict:
    so, sn = old["summary"], new["summary"]
    fields = {k: {"old": so[k], "new": sn.get(k), "agree": agree(k, so[k], sn.get(k))} for k in so if k not in TIMINGS}
    pairs = list(zip(old["cases"], new["cases"]))
    return {
        "models": [old["model"], new["model"]],
        "all_summary_figures_agree": all(f["agree"] for f in fields.values()),
        "summary": fields,
        "same_cases": [c["case"] for c in old["cases"]] == [c["case"] for c in new["cases"]],
        "per_case_dice_and_hd95_identical": all(a[k] == b[k] for a, b in pairs for k in a
                                                if k.startswith(("dice_", "hd95_"))),
        "per_case_qa_identical": all(a["qa"][q] == b["qa"][q] for a, b in pairs for q in QA),
        "timings": {k: {"old": so[k], "new": sn.get(k)} for k in TIMINGS},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="an `isl evaluate` JSON, e.g. the committed models/NAME/evaluation.json")
    ap.add_argument("new", type=Path, help="the rerun's")
    add_options(ap, json=None)
    args = ap.parse_args(argv)
    emit(stamped(compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()))), args.json)


if __name__ == "__main__":
    main()
