"""Print markdown tables of an `isl evaluate` JSON (for the results pages and the closing notes):

    python -m benchmarks.results_table EVAL.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [("baseline", "baseline"), ("ISL (as configured)", "isl"), ("flip TTA (8 mirrors)", "tta_flip"),
        ("TENT", "tent"), ("majority vote of the warped atlases", "majority_vote"),
        ("ISL ablation: fusion_only", "fusion_only"), ("ISL ablation: network_only", "network_only")]


def methods_table(r: dict) -> list[str]:
    """The heading line and, per method, mean Dice, mean HD95 and ISL's Wilcoxon p against it; then the cases ISL
    improved and worsened, its time and its QA."""
    s = r["summary"]
    conf = s.get("configuration") or {}
    lines = [f"Model `{r['model']}`, {s['n_cases']} held-out cases, {r['device']}; refinement method "
             f"`{s.get('config_used', {}).get('method', 'isl')}`" + (f" ({conf['reason']})" if conf else "") + ".\n",
             "| method | mean Dice | mean HD95 (mm) | Wilcoxon p, ISL vs this |", "|---|---|---|---|"]
    for name, key in ROWS:
        if f"mean_dice_{key}" not in s:
            continue
        p = "" if key == "isl" else s.get(f"wilcoxon_p_isl_vs_{key}")
        p = "" if p == "" else ("n/a" if p is None else f"{p:.3g}")
        lines.append(f"| {name} | {s[f'mean_dice_{key}']:.4f} | {s[f'mean_hd95_{key}']:.2f} | {p} |")
    lines.append(f"\nISL improved {s['cases_improved']} cases and worsened {s['cases_worsened']}; median ISL time per "
                 f"case {s['median_seconds_isl_per_case']:.1f} s (stages: "
                 + ", ".join(f"{k} {v:.1f}" for k, v in s["median_stage_seconds"].items())
                 + f"); peak RSS {s['peak_rss_mb']:.0f} MB; median folded share {s['median_folding_fraction']:.2e}.")
    return lines


def labels_table(s: dict) -> list[str]:
    """Per label (cases scored): each method's mean Dice and the cases ISL improved and worsened."""
    methods = [k for _, k in ROWS if f"mean_dice_{k}" in s]
    lines = ["\n| label (cases scored) | " + " | ".join(methods) + " | ISL improved / worsened |",
             "|---" * (len(methods) + 2) + "|"]
    for name, row in s["per_label"].items():
        c = s["per_label_cases"][name]
        lines.append(f"| {name} ({c['n']}) | " + " | ".join(f"{row[m]:.4f}" for m in methods)
                     + f" | {c['improved']} / {c['worsened']} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evaluation", type=Path, help="what `isl evaluate --json` wrote")
    r = json.loads(ap.parse_args(argv).evaluation.read_text())
    print("\n".join(methods_table(r) + (labels_table(r["summary"]) if r["summary"].get("per_label") else [])))


if __name__ == "__main__":
    main()
