"""Print a markdown table of an `isl evaluate` JSON (for the README): python benchmarks/results_table.py EVAL.json"""
import json
import sys

r = json.load(open(sys.argv[1]))
s = r["summary"]
rows = [("baseline", "baseline"), ("ISL", "isl"), ("flip TTA (8 mirrors)", "tta_flip"), ("TENT", "tent"),
        ("atlas fusion (majority vote)", "atlas_fusion")]
print(f"Model `{r['model']}`, {s['n_cases']} held-out cases, {r['device']}.\n")
print("| method | mean Dice | mean HD95 (mm) | Wilcoxon p, ISL vs this |")
print("|---|---|---|---|")
for name, key in rows:
    p = "" if key == "isl" else s.get(f"wilcoxon_p_isl_vs_{key}")
    p = "" if p == "" else ("n/a" if p is None else f"{p:.3g}")
    print(f"| {name} | {s[f'mean_dice_{key}']:.4f} | {s[f'mean_hd95_{key}']:.2f} | {p} |")
print(f"\nISL improved {s['cases_improved']} cases and worsened {s['cases_worsened']}; median ISL time per case "
      f"{s['median_seconds_isl_per_case']:.1f} s (stages: "
      + ", ".join(f"{k} {v:.1f}" for k, v in s["median_stage_seconds"].items())
      + f"); peak RSS {s['peak_rss_mb']:.0f} MB; median folded share {s['median_folding_fraction']:.2e}.")
