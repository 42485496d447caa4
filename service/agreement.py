"""Agreement between the automatic masks and the radiologists' corrections, the way the human-in-the-loop
pituitary study judged it (Radiology Practice 2024): per model version (one batch of corrected cases each, since
a new version follows a retraining) and per structure, the volumes before and after correction with a paired
t-test and a Wilcoxon signed-rank test, their Spearman correlation, the Dice of the automatic mask against the
correction, a Bland-Altman plot, and a verdict: converged when no structure's volumes differ significantly and
Dice and Spearman reach the thresholds (the study's 0.94 and 0.97 by default).

Computed from the corrections' records (jobstore/registry.py); scipy's tests, matplotlib's plot; no torch."""
from __future__ import annotations

import io
import math
from collections import defaultdict

import numpy as np

from jobstore.rows import Correction

MIN_CASES = 3  # fewer paired cases than this give no test


def _p(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def structure_agreement(auto_ml: list[float], corrected_ml: list[float], dice: list[float], alpha: float,
                        hausdorff: list[float] = (), average_hausdorff: list[float] = ()) -> dict:
    """Paired volumes (mL), Dice and surface distances (mm) of one structure over a batch's cases."""
    from scipy import stats

    a, c = np.asarray(auto_ml, float), np.asarray(corrected_ml, float)
    diff = a - c
    out = {"cases": len(a), "mean_auto_ml": round(float(a.mean()), 3), "mean_corrected_ml": round(float(c.mean()), 3),
           "mean_difference_ml": round(float(diff.mean()), 3),
           "limits_of_agreement_ml": [round(float(diff.mean() - 1.96 * diff.std(ddof=1)), 3),
                                      round(float(diff.mean() + 1.96 * diff.std(ddof=1)), 3)] if len(a) > 1 else None,
           "mean_dice": round(float(np.mean(dice)), 4), "min_dice": round(float(np.min(dice)), 4),
           "mean_hausdorff_mm": round(float(np.mean(hausdorff)), 3) if len(hausdorff) else None,
           "mean_average_hausdorff_mm": round(float(np.mean(average_hausdorff)), 3) if len(average_hausdorff) else None,
           "t_test_p": None, "wilcoxon_p": None, "spearman_rho": None, "volumes_differ": None}
    if len(a) < MIN_CASES:
        return out
    if np.allclose(diff, 0):  # no correction changed this structure's volume: nothing differs
        out.update(t_test_p=1.0, wilcoxon_p=1.0)
    else:
        out["t_test_p"] = _p(stats.ttest_rel(a, c).pvalue)
        out["wilcoxon_p"] = _p(stats.wilcoxon(a, c, zero_method="zsplit").pvalue)
    if np.ptp(a) > 0 and np.ptp(c) > 0:
        out["spearman_rho"] = _p(stats.spearmanr(a, c).statistic)
    out["volumes_differ"] = bool(min(p for p in (out["t_test_p"], out["wilcoxon_p"]) if p is not None) < alpha)
    return out


def _latest(corrections: list[Correction]) -> list[Correction]:
    """The last correction of each job (the job's truth), in the order the jobs were first corrected."""
    return list({r.job_id: r for r in sorted(corrections, key=lambda r: r.created)}.values())


def agreement(corrections: list[Correction], dice_min: float = 0.94, spearman_min: float = 0.97,
              alpha: float = 0.05, group_by: str | None = None) -> dict:
    """The agreement report of one model's corrections (rows of `Records.corrections`; the last correction of
    each job counts), per model version, oldest version first; with `group_by`, per model version and value of
    that key of the cases' metadata (subgroups such as age bands; '(none)' where a case lacks it)."""
    by_version: dict[tuple[str, str | None], list[Correction]] = defaultdict(list)
    for row in _latest(corrections):
        group = (row.summary.get("metadata") or {}).get(group_by, "(none)") if group_by else None
        by_version[(row.model_version, group)].append(row)
    batches = []
    for (version, group), rows in sorted(by_version.items(),
                                         key=lambda kv: (min(r.created for r in kv[1]), str(kv[0][1]))):
        names = sorted({n for r in rows for n in r.summary["per_label"]})
        per = {}
        for name in names:
            cases = [r.summary["per_label"][name] for r in rows if name in r.summary["per_label"]]
            per[name] = structure_agreement([x["refined_ml"] for x in cases], [x["corrected_ml"] for x in cases],
                                            [x["dice_refined_vs_corrected"] for x in cases], alpha,
                                            [x["hausdorff_mm"] for x in cases if "hausdorff_mm" in x],
                                            [x["average_hausdorff_mm"] for x in cases if "average_hausdorff_mm" in x])
        batches.append({"model_version": version, **({"group": {group_by: group}} if group_by else {}),
                        "cases": len(rows),
                        "first": min(r.created for r in rows), "last": max(r.created for r in rows),
                        "structures": per, **verdict(per, len(rows), dice_min, spearman_min)})
    return {"rule": {"alpha": alpha, "dice_min": dice_min, "spearman_min": spearman_min, "min_cases": MIN_CASES},
            "group_by": group_by, "batches": batches}


def verdict(per: dict[str, dict], cases: int, dice_min: float, spearman_min: float) -> dict:
    """converged (True/False, None with too few cases) and why, by the study's rule."""
    if cases < MIN_CASES:
        return {"converged": None, "why": f"{cases} corrected case(s); the tests need at least {MIN_CASES}"}
    reasons = []
    for name, s in per.items():
        if s["volumes_differ"]:
            reasons.append(f"{name}: volumes differ (t-test p {s['t_test_p']}, Wilcoxon p {s['wilcoxon_p']})")
        if s["mean_dice"] < dice_min:
            reasons.append(f"{name}: mean Dice {s['mean_dice']} < {dice_min}")
        if s["spearman_rho"] is not None and s["spearman_rho"] < spearman_min:
            reasons.append(f"{name}: Spearman {s['spearman_rho']} < {spearman_min}")
    return {"converged": not reasons, "why": "; ".join(reasons) or
            f"no structure's volumes differ, Dice >= {dice_min} and Spearman >= {spearman_min} for every one"}


def bland_altman_png(corrections: list[Correction], model: str, dice_min: float = 0.94,
                     spearman_min: float = 0.97) -> bytes:
    """One Bland-Altman panel per structure (latest model version's batch): the mean of the automatic and the
    corrected volume against their difference, with the mean difference and the 95% limits of agreement. Drawn on
    a Figure of its own (no pyplot state: the API serves requests from threads)."""
    from matplotlib.figure import Figure

    report = agreement(corrections, dice_min, spearman_min)
    if not report["batches"]:
        raise ValueError(f"model {model} has no corrections yet")
    batch = report["batches"][-1]
    rows = [r for r in _latest(corrections) if r.model_version == batch["model_version"]]
    names = list(batch["structures"])
    fig = Figure(figsize=(4.2 * len(names), 3.6))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        cases = [r.summary["per_label"][name] for r in rows if name in r.summary["per_label"]]
        a = np.array([x["refined_ml"] for x in cases])
        c = np.array([x["corrected_ml"] for x in cases])
        ax.scatter((a + c) / 2, a - c, s=18, color="#1f4e79")
        d = a - c
        ax.axhline(d.mean(), color="#444444", lw=1, label=f"mean {d.mean():+.2f} mL")
        if len(d) > 1:
            for sign in (-1, 1):
                ax.axhline(d.mean() + sign * 1.96 * d.std(ddof=1), color="#b03a2e", lw=1, ls="--")
        ax.set_title(f"{name} (n={len(d)})")
        ax.set_xlabel("mean of automatic and corrected (mL)")
        ax.set_ylabel("automatic - corrected (mL)")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{model} {batch['model_version']}: Bland-Altman, converged: {batch['converged']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
