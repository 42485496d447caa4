"""`isl evaluate`: baseline vs ISL vs three peers (flip TTA, TENT, the majority vote of the warped atlases) and
two ablations of ISL itself (`fusion_only`: the engine's fusion of its warped atlases without fine-tuning's
network; `network_only`: the fine-tuned network alone), on labelled cases that the model neither trained on,
configured on, nor uses as atlases. A case scores only the labels its reference contours (partial labels)."""
from __future__ import annotations

import json
import time

from imaging.dataset import load_case, load_dataset
from imaging.errors import DatasetError
from imaging.files import atomic_write_text
from imaging.metrics import dice
from isl.config import ISLConfig
from isl.evaluation.stats import METHODS, hd95, mean_over_labels, summarise
from isl.meta import BundleMeta
from isl.refiner import Refiner, load_refiner
from segmentation.adapt import tent
from segmentation.infer import predict
from segmentation.preprocess import to_native


def _decision(meta: BundleMeta) -> dict | None:
    """The configuration's decision as bundle.json records it (None for a bundle never configured)."""
    decision = meta.refinement and meta.refinement.decision
    return decision.model_dump(exclude_unset=True) if decision else None


def eligible_cases(ds, meta: BundleMeta, n: int | None) -> list[str]:
    """The first n case ids, in sorted order, that the model never trained on nor uses as atlases."""
    used = meta.used_cases
    ids = [c for c in sorted(c.case_id for c in ds.cases) if c not in used]
    if not ids:
        raise DatasetError(f"{ds.root}: every labelled case was used to train model {meta.version}; "
                           "nothing to evaluate on")
    return ids[:n] if n else ids


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - t0, 3)


def run_methods(refiner: Refiner, x) -> tuple[dict, dict, dict]:
    """Probabilities of every method on one preprocessed scan, their times, and ISL's own stage times and QA.
    `isl` is what refinement returns under the bundle's configuration (ISL itself, or the peer the configuration
    chose instead); the ablations and the majority vote come from an ISL run in every case."""
    pre, net, dev = refiner.pre, refiner.net, refiner.device
    res, t_isl = _timed(refiner.refine, x)
    tta, t_tta = _timed(predict, net, x, pre.patch_size, dev, pre.mirror_axes)
    adapted, t_tent = _timed(tent, net, x, pre.patch_size, dev)
    full, t_full = res, t_isl
    if refiner.cfg.method != "isl":  # the ablations, the majority vote and ISL's QA and stages come from a full run
        product, refiner.cfg = refiner.cfg, refiner.cfg.model_copy(update={"method": "isl"})
        try:
            full, t_full = _timed(refiner.refine, x)
        finally:
            refiner.cfg = product
    probs = {"baseline": res.baseline, "isl": res.probs, "tta_flip": tta, "tent": adapted,
             "majority_vote": full.atlas_vote, "fusion_only": full.part_on_grid("atlas"),
             "network_only": full.part_on_grid("network")}
    seconds = {"seconds_isl": t_isl, "seconds_isl_full_run": t_full, "seconds_tta_flip": t_tta, "seconds_tent": t_tent}
    qa = full.qa | {"method": res.qa["method"]}  # what was returned; the rest describes the ISL run
    return probs, seconds, {"stage_seconds": {k: round(v, 3) for k, v in full.seconds.items()}, "qa": qa}


def evaluate_case(refiner: Refiner, ds, case_id: str) -> tuple[dict, dict, object, object]:
    """One case's figures (Dice and HD95 per label and method, times, QA) on its native grid, the masks of
    every method, the truth and the image."""
    images, label, _ = load_case(ds, ds.case(case_id))
    x, canonical = refiner.pre.images(images)
    native, truth = images[0].geometry, label.array
    probs, seconds, extra = run_methods(refiner, x)
    names = refiner.bundle.segmentation.labels
    known = ds.case(case_id).present(names)
    fg = [v for v, k in zip(names, known) if v != 0 and k]
    out, masks = {"case": case_id}, {}
    for m, p in probs.items():
        masks[m] = to_native(p, canonical, native)
        out[f"dice_{m}"] = {names[k]: round(v, 5) for k, v in dice(masks[m], truth, fg).items()}
        out[f"hd95_{m}"] = {names[k]: round(v, 3) for k, v in hd95(masks[m], truth, fg, native.spacing[::-1]).items()}
    out.update(seconds)
    out.update(extra)
    return out, masks, truth, images[0].array


def _line(i: int, n: int, row: dict) -> str:
    means = {m: mean_over_labels(row[f"dice_{m}"]) for m in METHODS}
    return (f"[{i}/{n}] {row['case']}: " + " ".join(f"{m} {v:.4f}" for m, v in means.items())
            + f" ({row['seconds_isl']:.1f} s)")


def evaluate(dataset_dir, model_dir, json_out, *, atlas_dir=None, cases: int | None = None,
             cfg: ISLConfig | dict | None = None, figure: str | None = None, progress=print,
             command: str | None = None) -> dict:
    """Evaluate every method on the first `cases` eligible cases; writes the JSON (every per-case figure and
    the summary) and the figure, and returns the result. `cfg` as in `load_refiner` (None: the bundle's own)."""
    ds = load_dataset(dataset_dir)
    refiner = load_refiner(model_dir, atlas_dir or dataset_dir, cfg)
    cfg = refiner.cfg
    ids = eligible_cases(ds, refiner.bundle.info, cases)
    rows, example = [], None
    for i, case_id in enumerate(ids):
        row, masks, truth, image = evaluate_case(refiner, ds, case_id)
        rows.append(row)
        gain = mean_over_labels(row["dice_isl"]) - mean_over_labels(row["dice_baseline"])
        if example is None or gain > example[0]:
            example = (gain, case_id, image, truth, masks)
        progress(_line(i + 1, len(ids), row))
    result = {"command": command, "model": refiner.bundle.version, "dataset": str(dataset_dir),
              "device": str(refiner.device), "config": cfg.model_dump(mode="json"), "cases": rows,
              "summary": summarise(rows) | {"config_used": cfg.model_dump(mode="json"),
                                            "configuration": _decision(refiner.bundle.info)}}
    json_out = atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
    if json_out.resolve() == (refiner.bundle.path / "evaluation.json").resolve():  # the bundle's own: on its card
        from isl.training.card import dataset_metadata, write_model_card

        write_model_card(refiner.bundle.path, refiner.bundle.meta, dataset_metadata(ds.root))
    from isl.evaluation.figures import evaluation_figure

    evaluation_figure(rows, example, figure or json_out.with_suffix(".png"))
    return result
