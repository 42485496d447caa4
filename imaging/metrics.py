"""Per-label Dice, the project's one Dice: the engine, the evaluation, the tests and the benchmarks use it. (HD95 needs
MONAI and lives with the evaluation, `isl/evaluation/stats.py`.)"""
from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray, labels) -> dict[int, float]:
    """Dice per foreground label; 1.0 when a label is absent from both (nothing to find, nothing found)."""
    out = {}
    for v in labels:
        a, b = pred == v, truth == v
        denom = int(a.sum()) + int(b.sum())
        out[int(v)] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom
    return out


def mean_dice(pred: np.ndarray, truth: np.ndarray, labels=None) -> float:
    """Mean of `dice` over `labels` (default: every foreground label present in either map); 1.0 when none is."""
    if labels is None:
        labels = [v for v in np.union1d(np.unique(pred), np.unique(truth)) if v != 0]
    if len(labels) == 0:
        return 1.0
    return float(np.mean(list(dice(pred, truth, labels).values())))
