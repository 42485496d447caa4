"""Retraining: a new version of a bundle trained on its base data plus radiologists' corrections, with its lineage,
self-configured again, and judged against its parent by the promotion rule.

- Data: the parent's training cases (read from the base dataset) and every corrected case (the scan and the
  corrected label map, on the scan's grid; every label counts as contoured). The parent's preprocessing is kept,
  so that the corrections, the atlases and the judged cases are read the same way by both versions.
- Networks: warm-started from the parent's (the default, as MONAI Label retrains) or trained anew; the
  segmentation network for `iterations`, the registration network for `reg_iterations` (default: the parent's).
- Configuration: the refinement settings are searched again on the judged cases (isl/training/configure.py),
  as `isl train` does, unless the parent was trained with `--no-configure` or the request says so. With no case to
  search on, the parent's choice carries over (for a bundle trained on too few cases to configure: the network's
  own mask).
- Promotion rule: the new version goes live only when its refined masks are no worse than its parent's on cases
  neither trained on: mean Dice over the cases and labels at least the parent's minus `margin`. The cases are the
  parent's validation cases; for a parent that has none, the base dataset's cases that it neither trained on,
  uses as atlases, nor holds out as its test split (at most `judge_cases`); and where there are none either (a
  model trained on all its few cases, as a hospital's first one is), corrections held back from this training:
  once base and corrected cases reach 10, a fifth of them (3 to 10, as `isl train` sets validation cases aside),
  drawn from the corrections the parent did not train on. The held-back corrections are the tenant's own data,
  so the new version is configured and judged on what the hospital sends. With no case at all the version is not
  judged and stays a candidate: a person may promote it (the audit trail keeps who).
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from imaging.dataset import load_case, load_dataset
from imaging.errors import DatasetError
from imaging.io import read_image
from imaging.metrics import dice
from isl.bundle import ISLBundle
from isl.meta import BundleMeta
from isl.training.plan import validation_count
from isl.training.train import (
    _train_registrar,
    configure_bundle,
    curve_points,
    unconfigured_record,
)
from segmentation.bundle import SegmentationModel
from segmentation.train import train_network


@dataclass(frozen=True)
class RetrainConfig:
    """What a retraining may change from its parent's training; None keeps the parent's value. The API validates the
    same fields as `jobstore.records.RetrainOptions` and the worker passes them on."""

    iterations: int | None = None  # segmentation training iterations
    reg_iterations: int | None = None  # registration training iterations
    warm_start: bool = True  # start from the parent's networks, else from random weights
    configure: bool | None = None  # search the refinement settings again
    configure_minutes: float | None = None  # budget of that search
    judge_cases: int = 10  # at most this many unseen cases judge the new version
    margin: float = 0.0  # the new version's mean Dice may be at most this much under its parent's


class Correction(BaseModel):
    """A corrected case: its id (the correction's), its files on the scan's grid, and the names of the structures
    it contours (None: all; a correction through the service contours all)."""

    id: str
    image: Path
    label: Path
    structures: list[str] | None = None
    further_images: list[Path] = []  # a model of several sequences: the second, third... on the first one's grid

    @classmethod
    def stored(cls, id: str, folder: Path) -> Correction:
        """A correction as the service keeps it: image.nii.gz (image_0001.nii.gz... for further sequences) and
        label.nii.gz in `folder`."""
        return cls(id=id, image=folder / "image.nii.gz", label=folder / "label.nii.gz",
                   further_images=sorted(folder.glob("image_[0-9][0-9][0-9][0-9].nii.gz")))

    @property
    def images(self) -> list[Path]:
        return [self.image, *self.further_images]

    def known(self, labels: dict[int, str]) -> np.ndarray:
        return np.array([v == 0 or self.structures is None or n in self.structures for v, n in labels.items()])


def judged_cases(ds, meta: BundleMeta, n: int) -> list[str]:
    """The base dataset's cases the promotion rule judges on (see the module's docstring)."""
    ids = [c for c in meta.validation_cases if c in {x.case_id for x in ds.cases}]
    if not ids:
        used = set(meta.train_cases) | set(meta.atlases) | set(meta.holdout_cases)
        ids = sorted(c.case_id for c in ds.cases if c.case_id not in used)
    return ids[:n]


def held_back(corrections: list[Correction], meta: BundleMeta, seed: int) -> list[Correction]:
    """The corrections this training sets aside to configure and judge the new version on, where the base dataset
    has no case for it: a fifth of all cases (3 to 10; none under 10 cases, as `isl train` decides its validation
    cases), drawn from the corrections the parent did not train on (it may have held them back itself)."""
    trained = set(meta.corrections)
    new = [c for c in corrections if c.id not in trained]
    n = min(validation_count(len(meta.train_cases) + len(corrections), None), len(new))
    if n < 2:
        return []
    picked = np.random.default_rng(seed).choice(len(new), n, replace=False)
    return [new[i] for i in sorted(picked)]


def corrections_dataset(corrections: list[Correction], base, folder: Path):
    """A dataset folder of `corrections` (links to their files, never copies) readable as the base dataset is:
    its labels and channel, and cases.json where a correction contours only some structures."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    several = len(base.channel_names) > 1
    for c in corrections:
        images = [(src, folder / "imagesTr" / (f"{c.id}_{k:04d}.nii.gz" if several else f"{c.id}.nii.gz"))
                  for k, src in enumerate(c.images)]
        for src, dst in [*images, (c.label, folder / "labelsTr" / f"{c.id}.nii.gz")]:
            dst.unlink(missing_ok=True)
            dst.symlink_to(Path(src).resolve())
    meta = {"name": f"{base.name} corrections", "labels": {n: v for v, n in base.labels.items()},
            "channel_names": dict(enumerate(base.channel_names)), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    rows = [{"case": c.id, "structures_present": c.structures} for c in corrections if c.structures is not None]
    if rows:
        (folder / "cases.json").write_text(json.dumps(rows))
    return load_dataset(folder)


def score(bundle: ISLBundle, ds, case_ids: list[str], device: torch.device, atlas_dir=None) -> dict[str, float]:
    """Mean Dice per case (over the labels its reference contours) of what refinement returns under the bundle's
    own configuration; its atlases are read from `atlas_dir` (default: the dataset of the cases)."""
    from isl.refiner import Refiner
    from segmentation.preprocess import to_native

    cfg = bundle.refinement_config({"device": device.type})
    refiner = Refiner(bundle, bundle.load_atlases(atlas_dir or ds.root, context=cfg.affine.kind != "none"), cfg,
                      device)
    names = bundle.segmentation.labels
    out = {}
    for case_id in case_ids:
        images, label, _ = load_case(ds, ds.case(case_id))
        x, canonical = refiner.pre.images(images)
        probs = refiner.refine(x).probs
        known = ds.case(case_id).present(names)
        fg = [v for v, k in zip(names, known) if v != 0 and k]
        per_label = dice(to_native(probs, canonical, images[0].geometry), label.array, fg)
        out[case_id] = round(float(np.mean(list(per_label.values()))), 5) if per_label else float("nan")
    return out


def judge(parent: dict[str, float], child: dict[str, float], margin: float) -> dict:
    """The promotion rule on per-case Dice of both versions over the same cases."""
    if not child:
        return {"judged": False, "promoted": False, "reason": "no case that the new version has not trained on: it "
                "stays a candidate (promote it by hand if you have judged it otherwise)"}
    p, c = float(np.mean(list(parent.values()))), float(np.mean(list(child.values())))
    better = sum(child[k] > parent[k] for k in child)
    worse = sum(child[k] < parent[k] for k in child)
    ok = c >= p - margin
    reason = (f"mean Dice {c:.4f} against its parent's {p:.4f} on {len(child)} cases neither trained on "
              f"({better} better, {worse} worse): {'no worse' if ok else 'worse'} than the parent"
              + (f" within the margin {margin}" if margin else ""))
    return {"judged": True, "promoted": ok, "reason": reason, "mean_dice": round(c, 5),
            "parent_mean_dice": round(p, 5), "cases": len(child), "better": better, "worse": worse, "margin": margin}


def retrain(parent_dir: str | Path, dataset_dir: str | Path, corrections: list[Correction], out_dir: str | Path,
            cfg: RetrainConfig, device: torch.device, progress=print, command: str | None = None) -> dict:
    """Train a new version of the bundle at `parent_dir` into `out_dir`; returns its lineage, data, validation
    figures and the promotion rule's verdict (`outcome`). Nothing is made live here."""
    t0 = time.perf_counter()
    parent = ISLBundle.load(parent_dir, device)
    ds = load_dataset(dataset_dir)
    meta = parent.meta
    missing = [c for c in meta["train_cases"] if c not in {x.case_id for x in ds.cases}]
    if missing:
        raise DatasetError(f"{ds.root} lacks {len(missing)} of model {parent.version}'s training cases "
                           f"({', '.join(missing[:3])}...): retraining needs the base dataset it was trained on")
    train_cfg = copy.deepcopy(parent_train_config(meta.get("config") or {}))
    judged = judged_cases(ds, parent.info, cfg.judge_cases)
    held = [] if judged else held_back(corrections, parent.info, train_cfg.training.seed)
    trained = [c for c in corrections if c not in held]
    images, labels, known = _training_data(parent, ds, corrections, held)
    progress(f"retraining {parent.version} on {len(meta['train_cases'])} base cases and {len(trained)} "
             f"corrected cases" + (f", {len(held)} corrections held back to configure and judge it" if held else ""))
    if cfg.iterations:
        train_cfg.training.iterations = cfg.iterations
    if cfg.reg_iterations:
        train_cfg.registration.iterations = cfg.reg_iterations
    seg, reg, training = _train_networks(parent, images, labels, known, train_cfg, cfg.warm_start, device, progress)
    new_meta = {k: v for k, v in meta.items() if k not in ("version", "refinement", "held_back_corrections")} | {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "parent": parent.version,
        "lineage": list(meta.get("lineage", [])) + [parent.version],
        "corrections": [c.id for c in trained],
        **({"held_back_corrections": [c.id for c in held]} if held else {}),
        "config": train_cfg.model_dump(mode="json"),
        "training": training,
    }
    seg.network.cpu()
    child = ISLBundle(seg, reg.cpu(), new_meta, Path(out_dir))
    child.save()
    judged, outcome = _configure_and_judge(child, parent_dir, parent.info, ds, cfg, train_cfg, judged, held,
                                           len(trained), device, progress)
    from isl.training.card import dataset_metadata, write_model_card

    write_model_card(child.path, child.meta, dataset_metadata(ds.root))
    progress(f"{child.version}: {outcome['reason']}")
    return {"version": child.version, "parent": meta["version"], "folder": str(child.path),
            "data": {"base_dataset": ds.name, "base_cases": len(meta["train_cases"]),
                     "corrections": [c.id for c in trained], "held_back_corrections": [c.id for c in held]},
            "figures": child.meta["promotion"] | {"judged_cases": judged,
                                                  "configuration": (child.meta.get("refinement") or {}).get(
                                                      "decision")},
            "outcome": outcome, "seconds": round(time.perf_counter() - t0, 1)}


def _training_data(parent: ISLBundle, ds, corrections: list[Correction], held: list[Correction]):
    """The base training cases and the corrections not held back, preprocessed as the parent was: (images, labels,
    which labels each case contours). Every correction is checked, held back or not."""
    names = parent.segmentation.labels
    pre = parent.segmentation.preprocessing
    images, labels, known = [], [], []
    for case_id in parent.meta["train_cases"]:
        vols, label, _ = load_case(ds, ds.case(case_id))
        images.append(pre.images(vols)[0])
        labels.append(pre.label(label))
        known.append(ds.case(case_id).present(names))
    for c in corrections:
        label = read_image(c.label)
        values = np.unique(label.array)
        if values.max(initial=0) >= len(names):
            raise DatasetError(f"correction {c.id}: label values {values.tolist()} do not fit {names}")
        if len(c.images) != len(ds.channel_names):
            raise DatasetError(f"correction {c.id}: {len(c.images)} sequence(s) kept with it; model {parent.version} "
                               f"takes {len(ds.channel_names)} ({', '.join(ds.channel_names)})")
        if c in held:
            continue
        images.append(pre.images([read_image(p) for p in c.images])[0])
        labels.append(pre.label(label))
        known.append(c.known(names))
    return images, labels, np.stack(known)


def _train_networks(parent: ISLBundle, images, labels, known, train_cfg, warm_start: bool, device: torch.device,
                    progress):
    """Both networks of the new version, from the parent's (warm start) or from random weights; (segmentation,
    registrar, the training record)."""
    pre, names = parent.segmentation.preprocessing, parent.segmentation.labels
    seg = parent.segmentation if warm_start else SegmentationModel.create(train_cfg.network, pre, names)
    if not warm_start:
        torch.manual_seed(train_cfg.training.seed)
    t_seg = time.perf_counter()
    curve = train_network(seg.network, images, labels, pre.patch_size, train_cfg.training, device,
                          lambda it, loss: progress(f"segmentation iteration {it}/{train_cfg.training.iterations}: "
                                                    f"loss {loss:.4f}"), annotated=known, mirror_axes=pre.mirror_axes)
    t_seg = time.perf_counter() - t_seg
    t_reg = time.perf_counter()
    reg, reg_curve = _train_registrar(images, labels, known, pre, train_cfg, device, progress,
                                      start=parent.registrar if warm_start else None)
    t_reg = time.perf_counter() - t_reg
    return seg, reg, {"segmentation_seconds": round(t_seg, 1), "registration_seconds": round(t_reg, 1),
                      "segmentation_final_loss": float(np.mean(curve[-100:])),
                      "registration_final_loss": float(np.mean(reg_curve[-100:])), "warm_start": warm_start,
                      "curves": {"segmentation": curve_points(curve), "registration": curve_points(reg_curve)},
                      "device": str(device), "torch": torch.__version__}


def _configure_and_judge(child: ISLBundle, parent_dir, parent: BundleMeta, ds, cfg: RetrainConfig, train_cfg,
                         judged: list[str], held: list[Correction], n_trained: int, device: torch.device, progress):
    """Configure the new version (or carry the parent's choice over), then score parent and child on the cases
    neither trained on (the judged dataset cases, else the held-back corrections); (judged ids, the verdict)."""
    with tempfile.TemporaryDirectory(prefix="isl-held-back-") as tmp:
        cases = corrections_dataset(held, ds, Path(tmp)) if held else ds  # where the judged cases are read
        judged = judged or [c.id for c in held]
        if judged and (cfg.configure if cfg.configure is not None else train_cfg.configure):
            minutes = cfg.configure_minutes or train_cfg.configure_minutes
            configure_bundle(child, cases, judged, minutes * 60, device, progress, atlas_dir=ds.root)
        elif parent.refinement and parent.refinement.decision and parent.refinement.decision.configured is False:
            child.meta["refinement"] = unconfigured_record(len(parent.train_cases) + n_trained,  # still too few
                                                           child.refinement_config())
            child.save()
        elif parent.refinement:  # not searched again: the parent's choice carries over
            child.meta["refinement"] = parent.refinement.model_dump(exclude_unset=True)
            child.save()
        progress(f"judging {child.version} against {parent.version} on {len(judged)} cases neither trained on")
        before = ISLBundle.load(parent_dir, device)  # the warm start trained the loaded parent's network in place
        parent_scores = score(before, cases, judged, device, ds.root)
        child_scores = score(child, cases, judged, device, ds.root)
    outcome = judge(parent_scores, child_scores, cfg.margin)
    child.meta["promotion"] = outcome | {"per_case": {"parent": parent_scores, "candidate": child_scores}}
    child.save()
    return judged, outcome


def parent_train_config(config: dict):
    """The parent's BundleTrainConfig (the defaults for fields it predates)."""
    from isl.training.train import BundleTrainConfig

    return BundleTrainConfig.model_validate({k: v for k, v in config.items()
                                             if k in BundleTrainConfig.model_fields})
