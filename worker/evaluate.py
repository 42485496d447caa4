"""`isl evaluate`: baseline vs ISL vs three peers (flip TTA, TENT, majority-vote atlas fusion) on
labelled cases that the model neither trained on nor uses as atlases."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from segmentation.adapt import tent
from segmentation.dataset import load_case, load_dataset
from segmentation.errors import DatasetError
from segmentation.infer import predict
from segmentation.metrics import dice, hd95
from segmentation.preprocess import to_native
from worker.config import ISLConfig
from worker.pipeline import load_refiner

METHODS = ("baseline", "isl", "tta_flip", "tent", "atlas_fusion")


def eligible_cases(ds, meta: dict, n: int | None) -> list[str]:
    """The first n case ids, in sorted order, that the model never trained on nor uses as atlases."""
    used = set(meta.get("train_cases", [])) | set(meta.get("atlases", []))
    ids = [c for c in sorted(c.case_id for c in ds.cases) if c not in used]
    if not ids:
        raise DatasetError(f"{ds.root}: every labelled case was used to train model {meta.get('version')}; nothing to evaluate on")
    return ids[:n] if n else ids


def _mean_fg(scores: dict) -> float:
    return float(np.mean(list(scores.values())))


def _pvalue(a, b) -> float | None:
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.allclose(d, 0):
        return None
    return float(wilcoxon(a, b).pvalue)


def evaluate_case(refiner, ds, case_id: str) -> dict:
    images, label, _ = load_case(ds, ds.case(case_id))
    pre, net, dev = refiner.pre, refiner.net, refiner.device
    x, canonical = pre.images(images)
    native, truth = images[0].geometry, label.array
    t0 = time.perf_counter()
    res = refiner.refine(x)
    t_isl = time.perf_counter() - t0
    t0 = time.perf_counter()
    tta = predict(net, x, pre.patch_size, dev, flips=True)
    t_tta = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapted = tent(net, x, pre.patch_size, dev)
    t_tent = time.perf_counter() - t0
    probs = {"baseline": res.baseline, "isl": res.probs, "tta_flip": tta, "tent": adapted, "atlas_fusion": res.atlas_vote}
    fg = [v for v in refiner.bundle.segmentation.labels if v != 0]
    names = refiner.bundle.segmentation.labels
    out = {"case": case_id}
    masks = {}
    for m, p in probs.items():
        masks[m] = to_native(p, canonical, native)
        out[f"dice_{m}"] = {names[k]: round(v, 5) for k, v in dice(masks[m], truth, fg).items()}
        out[f"hd95_{m}"] = {names[k]: round(v, 3) for k, v in hd95(masks[m], truth, fg, native.spacing[::-1]).items()}
    out.update({"seconds_isl": round(t_isl, 3), "seconds_tta_flip": round(t_tta, 3), "seconds_tent": round(t_tent, 3),
                "stage_seconds": {k: round(v, 3) for k, v in res.seconds.items()}, "qa": res.qa})
    return out, masks, truth, images[0].array


def summarise(cases: list[dict]) -> dict:
    mean = {m: [_mean_fg(c[f"dice_{m}"]) for c in cases] for m in METHODS}
    summary = {f"mean_dice_{m}": float(np.mean(v)) for m, v in mean.items()}
    summary.update({f"mean_hd95_{m}": float(np.nanmean([np.nanmean(list(c[f"hd95_{m}"].values())) for c in cases]))
                    for m in METHODS})
    summary["wilcoxon_p_isl_vs_baseline"] = _pvalue(mean["isl"], mean["baseline"])
    for m in ("tta_flip", "tent", "atlas_fusion"):
        summary[f"wilcoxon_p_isl_vs_{m}"] = _pvalue(mean["isl"], mean[m])
    delta = np.asarray(mean["isl"]) - np.asarray(mean["baseline"])
    summary["cases_improved"] = int(np.sum(delta > 1e-6))
    summary["cases_worsened"] = int(np.sum(delta < -1e-6))
    summary["n_cases"] = len(cases)
    summary["median_seconds_isl_per_case"] = float(np.median([c["seconds_isl"] for c in cases]))
    stages = sorted({k for c in cases for k in c["stage_seconds"]})
    summary["median_stage_seconds"] = {s: float(np.median([c["stage_seconds"].get(s, 0.0) for c in cases])) for s in stages}
    summary["median_folding_fraction"] = float(np.median([c["qa"]["folding_fraction"] for c in cases]))
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return summary


def evaluate(dataset_dir, model_dir, json_out, *, atlas_dir=None, cases: int | None = None, device: str = "auto",
             atlases: int | None = None, figure: str | None = None, cfg: ISLConfig | None = None,
             progress=print, command: str | None = None) -> dict:
    ds = load_dataset(dataset_dir)
    cfg = cfg or ISLConfig(device=device)
    if atlases is not None:
        cfg.atlases = atlases
    refiner = load_refiner(model_dir, atlas_dir or dataset_dir, cfg, device)
    ids = eligible_cases(ds, refiner.bundle.meta, cases)
    rows, example = [], None
    for i, case_id in enumerate(ids):
        row, masks, truth, image = evaluate_case(refiner, ds, case_id)
        rows.append(row)
        gain = _mean_fg(row["dice_isl"]) - _mean_fg(row["dice_baseline"])
        if example is None or gain > example[0]:
            example = (gain, case_id, image, truth, masks)
        progress(f"[{i + 1}/{len(ids)}] {case_id}: baseline {_mean_fg(row['dice_baseline']):.4f} isl {_mean_fg(row['dice_isl']):.4f} "
                 f"tta {_mean_fg(row['dice_tta_flip']):.4f} tent {_mean_fg(row['dice_tent']):.4f} "
                 f"fusion {_mean_fg(row['dice_atlas_fusion']):.4f} ({row['seconds_isl']:.1f} s)")
    result = {"command": command, "model": refiner.bundle.version, "dataset": str(dataset_dir), "device": str(refiner.device),
              "config": cfg.model_dump(mode="json"), "cases": rows, "summary": summarise(rows)}
    json_out = Path(json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    from worker.figures import evaluation_figure

    evaluation_figure(rows, example, figure or json_out.with_suffix(".png"))
    return result
