"""Print markdown tables of an `isl evaluate` JSON (for the README and the closing notes):
python benchmarks/results_table.py EVAL.json"""
import json
import sys

r = json.load(open(sys.argv[1]))
s = r["summary"]
rows = [("baseline", "baseline"), ("ISL (as configured)", "isl"), ("flip TTA (8 mirrors)", "tta_flip"),
        ("TENT", "tent"), ("majority vote of the warped atlases", "majority_vote"),
        ("ISL ablation: fusion_only", "fusion_only"), ("ISL ablation: network_only", "network_only")]
conf = s.get("configuration") or {}
print(f"Model `{r['model']}`, {s['n_cases']} held-out cases, {r['device']}; refinement method "
      f"`{s.get('config_used', {}).get('method', 'isl')}`" + (f" ({conf['reason']})" if conf else "") + ".\n")
print("| method | mean Dice | mean HD95 (mm) | Wilcoxon p, ISL vs this |")
print("|---|---|---|---|")
for name, key in rows:
    if f"mean_dice_{key}" not in s:
        continue
    p = "" if key == "isl" else s.get(f"wilcoxon_p_isl_vs_{key}")
    p = "" if p == "" else ("n/a" if p is None else f"{p:.3g}")
    print(f"| {name} | {s[f'mean_dice_{key}']:.4f} | {s[f'mean_hd95_{key}']:.2f} | {p} |")
print(f"\nISL improved {s['cases_improved']} cases and worsened {s['cases_worsened']}; median ISL time per case "
      f"{s['median_seconds_isl_per_case']:.1f} s (stages: "
      + ", ".join(f"{k} {v:.1f}" for k, v in s["median_stage_seconds"].items())
      + f"); peak RSS {s['peak_rss_mb']:.0f} MB; median folded share {s['median_folding_fraction']:.2e}.")
if s.get("per_label"):
    methods = [k for _, k in rows if f"mean_dice_{k}" in s]
    print("\n| label (cases scored) | " + " | ".join(methods) + " | ISL improved / worsened |")
    print("|---" * (len(methods) + 2) + "|")
    for name, row in s["per_label"].items():
        c = s["per_label_cases"][name]
        print(f"| {name} ({c['n']}) | " + " | ".join(f"{row[m]:.4f}" for m in methods)
              + f" | {c['improved']} / {c['worsened']} |")
