"""How much any per-case choice between ISL and the network could add, from a bundle's configuration scores:

    python -m benchmarks.selection_bound models/MODEL/configuration_scores.json \\
        > benchmarks/results/selection_bound_MODEL.json

For every searched ISL setting, an oracle that knew, for each label of each validation case, whether the setting's
mix or the starting mask scored higher, and took the higher. No per-case safety rule can do better than that
oracle for that setting (it sees only the scan, not the reference), so it bounds what per-case selection can add
with this engine. Also: the same oracle free to pick any setting per case and label (a looser bound, mostly noise
at hundreds of settings), and each label's gains under the setting whose oracle is best. Prints JSON (and writes
it with --json)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.common import add_options, emit, stamped
from isl.training.configure import Setting, _start_key, case_mean, load_scores


def oracle(per_case: list[dict], k: Setting) -> float:
    """Mean Dice of setting `k` where, per case and label, the better of its mix and the starting mask is taken."""
    s = _start_key(k)
    return float(np.mean([np.mean([max(c[s][v], c[k][v]) for v in c[s]]) for c in per_case]))


def free_oracle(per_case: list[dict], settings: list[Setting], start: str) -> float:
    """The same oracle free to pick, per case and label, any setting of the same starting mask."""
    return float(np.mean([np.mean([max([c[start][v]] + [c[k][v] for k in settings if _start_key(k) == start])
                                   for v in c[start]]) for c in per_case]))


def bound(scores: str) -> dict:
    ids, per_case = load_scores(scores)
    settings = [k for k in per_case[0] if isinstance(k, Setting)]
    labels = sorted({v for c in per_case for v in c["baseline"]})
    bundle = Path(scores).parent / "bundle.json"  # label names, where the scores sit beside their bundle
    names = json.loads(bundle.read_text())["dataset"]["labels"] if bundle.exists() else {}
    rows = sorted(((oracle(per_case, k), float(np.mean([case_mean(c[k]) for c in per_case])), k) for k in settings),
                  key=lambda r: -r[0])
    best = rows[0][2]
    start = _start_key(best)
    return {
        "scores": scores, "validation_cases": ids, "settings": len(settings),
        "mean_dice_baseline": round(float(np.mean([case_mean(c["baseline"]) for c in per_case])), 5),
        "mean_dice_tta_flip": round(float(np.mean([case_mean(c["tta_flip"]) for c in per_case])), 5),
        "best_setting_oracle_per_case_and_label": {"setting": asdict(best), "mean_dice": round(rows[0][0], 5),
                                                   "mean_dice_without_oracle": round(rows[0][1], 5)},
        "oracle_over_all_settings_per_case_and_label": round(free_oracle(per_case, settings, start), 5),
        "per_label_gain_of_best_setting": {
            names.get(str(v), str(v)): [round(c[best][v] - c[start][v], 4) for c in per_case if v in c[start]]
            for v in labels},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scores", help="a bundle's configuration_scores.json")
    add_options(ap, json=None)
    args = ap.parse_args(argv)
    emit(stamped(bound(args.scores)), args.json, indent=1)


if __name__ == "__main__":
    main()
