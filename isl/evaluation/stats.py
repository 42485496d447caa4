"""The summary of an evaluation: mean Dice and HD95 per method, Wilcoxon signed-rank tests of ISL against each
other method, cases improved and worsened (overall and per label), time and memory. A case scores only the labels
its reference contours (partial labels), so per-case means run over those."""
from __future__ import annotations

import resource

import numpy as np
from scipy.stats import wilcoxon

METHODS = ("baseline", "isl", "tta_flip", "tent", "majority_vote", "fusion_only", "network_only")
PEERS = ("tta_flip", "tent", "majority_vote", "fusion_only", "network_only")


def mean_over_labels(scores: dict) -> float:
    """A case's mean over its foreground labels of a per-label figure."""
    return float(np.mean(list(scores.values())))


def paired_p(a, b) -> float | None:
    """Wilcoxon signed-rank p of paired per-case figures; None when there is nothing to test."""
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.allclose(d, 0):
        return None
    return float(wilcoxon(a, b).pvalue)


def summarise(cases: list[dict]) -> dict:
    mean = {m: [mean_over_labels(c[f"dice_{m}"]) for c in cases] for m in METHODS}
    summary = {f"mean_dice_{m}": float(np.mean(v)) for m, v in mean.items()}
    summary.update({f"mean_hd95_{m}": float(np.nanmean([np.nanmean(list(c[f"hd95_{m}"].values())) for c in cases]))
                    for m in METHODS})
    summary["wilcoxon_p_isl_vs_baseline"] = paired_p(mean["isl"], mean["baseline"])
    for m in PEERS:
        summary[f"wilcoxon_p_isl_vs_{m}"] = paired_p(mean["isl"], mean[m])
    delta = np.asarray(mean["isl"]) - np.asarray(mean["baseline"])
    summary["cases_improved"] = int(np.sum(delta > 1e-6))
    summary["cases_worsened"] = int(np.sum(delta < -1e-6))
    summary["n_cases"] = len(cases)
    summary["per_label"] = per_label(cases)
    summary["per_label_cases"] = per_label_cases(cases)
    summary["median_seconds_isl_per_case"] = float(np.median([c["seconds_isl"] for c in cases]))
    summary["median_seconds_isl_full_run_per_case"] = float(np.median([c.get("seconds_isl_full_run", c["seconds_isl"])
                                                                       for c in cases]))
    stages = sorted({k for c in cases for k in c["stage_seconds"]})
    summary["median_stage_seconds"] = {s: float(np.median([c["stage_seconds"].get(s, 0.0) for c in cases]))
                                       for s in stages}
    summary["median_folding_fraction"] = float(np.median([c["qa"]["folding_fraction"] for c in cases]))
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return summary


def per_label(cases: list[dict]) -> dict:
    """label name -> method -> mean Dice over the cases whose reference contours that label."""
    labels = dict.fromkeys(name for c in cases for name in c["dice_baseline"])  # in label order
    return {name: {m: float(np.mean([c[f"dice_{m}"][name] for c in cases if name in c[f"dice_{m}"]]))
                   for m in METHODS} for name in labels}


def per_label_cases(cases: list[dict]) -> dict:
    """label name -> cases scored, improved and worsened by ISL over the baseline (Dice, per label), and the
    Wilcoxon p of ISL vs the baseline on that label."""
    out = {}
    for name in per_label(cases):
        a = [c["dice_isl"][name] for c in cases if name in c["dice_isl"]]
        b = [c["dice_baseline"][name] for c in cases if name in c["dice_baseline"]]
        d = np.asarray(a) - np.asarray(b)
        out[name] = {"n": len(a), "improved": int(np.sum(d > 1e-6)), "worsened": int(np.sum(d < -1e-6)),
                     "wilcoxon_p_isl_vs_baseline": paired_p(a, b)}
    return out


def hd95(pred: np.ndarray, truth: np.ndarray, labels, spacing_zyx) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per label; NaN when either side is empty."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    out = {}
    for v in labels:
        a = torch.from_numpy(pred == v)[None, None]
        b = torch.from_numpy(truth == v)[None, None]
        if not a.any() or not b.any():
            out[int(v)] = float("nan")
            continue
        d = compute_hausdorff_distance(a, b, percentile=95, spacing=list(spacing_zyx))
        out[int(v)] = float(d.item())
    return out
