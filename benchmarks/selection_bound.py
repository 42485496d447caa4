"""How much any per-case choice between ISL and the network could add, from a bundle's configuration scores:
python benchmarks/selection_bound.py models/MODEL/configuration_scores.json \
    > benchmarks/results/selection_bound_MODEL.json

For every searched ISL setting, an oracle that knew, for each label of each validation case, whether the setting's
mix or the starting mask scored higher, and took the higher. No per-case safety rule can do better than that
oracle for that setting (it sees only the scan, not the reference), so it bounds what per-case selection can add
with this engine. Also: the same oracle free to pick any setting per case and label (a looser bound, mostly noise
at hundreds of settings), and each label's gains under the setting whose oracle is best. Prints JSON."""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from isl.training.configure import Setting, _start_key, case_mean, load_scores

ids, per_case = load_scores(sys.argv[1])
settings = [k for k in per_case[0] if isinstance(k, Setting)]
labels = sorted({v for c in per_case for v in c["baseline"]})
bundle = Path(sys.argv[1]).parent / "bundle.json"  # label names, where the scores sit beside their bundle
names = json.loads(bundle.read_text())["dataset"]["labels"] if bundle.exists() else {}


def oracle(k: Setting) -> float:
    s = _start_key(k)
    return float(np.mean([np.mean([max(c[s][v], c[k][v]) for v in c[s]]) for c in per_case]))


rows = sorted(((oracle(k), float(np.mean([case_mean(c[k]) for c in per_case])), k) for k in settings),
              key=lambda r: -r[0])
best = rows[0][2]
start = _start_key(best)
free = float(np.mean([np.mean([max([c[start][v]] + [c[k][v] for k in settings if _start_key(k) == start])
                               for v in c[start]]) for c in per_case]))
print(json.dumps({
    "scores": sys.argv[1], "validation_cases": ids, "settings": len(settings),
    "mean_dice_baseline": round(float(np.mean([case_mean(c["baseline"]) for c in per_case])), 5),
    "mean_dice_tta_flip": round(float(np.mean([case_mean(c["tta_flip"]) for c in per_case])), 5),
    "best_setting_oracle_per_case_and_label": {"setting": asdict(best), "mean_dice": round(rows[0][0], 5),
                                               "mean_dice_without_oracle": round(rows[0][1], 5)},
    "oracle_over_all_settings_per_case_and_label": round(free, 5),
    "per_label_gain_of_best_setting": {
        names.get(str(v), str(v)): [round(c[best][v] - c[start][v], 4) for c in per_case if v in c[start]]
        for v in labels},
}, indent=1))
