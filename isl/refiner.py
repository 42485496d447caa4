"""Inference-specific learning on one scan (Chen et al., Medical Physics 2025), composed from the segmentation
and registration packages; `Refiner.refine` reads as the method does:

1. the initial network's baseline, and the starting mask (flip-averaged) in a region of interest around it
   (`isl/mask.py`);
2. every atlas registered toward the scan by the learned network, the K most similar kept, and their
   displacements instance-optimised with the weak-supervision Dice to the scan's current mask
   (`isl/align.py`);
3. a per-case copy of the network fine-tuned on the K deformed atlases; the scan's mask is an exponential
   moving average of its predictions, fed back into re-registration, until it stops changing
   (`isl/finetune.py`);
4. the final mask mixes the tuned network's prediction with the non-local fusion of the warped atlas labels,
   each atlas weighted per voxel by its local similarity to the scan (`isl/mask.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imaging.errors import InputError
from imaging.metrics import mean_dice
from isl.align import Aligner, fuse, majority_vote
from isl.bundle import Atlases, ISLBundle
from isl.config import ISLConfig
from isl.finetune import Tuned, finetune
from isl.mask import Start, final_mix, initial_mask, roi_onehot_on
from isl.timer import Timer
from registration.instance import folding_fraction
from segmentation.preprocess import paste

CORRECTION_PREFIX = "correction:"  # the case id of an atlas made from a radiologist's correction


@dataclass
class ISLResult:
    """Probabilities (L, z, y, x) on the canonical grid, for the refined mask and the peers it yields for free."""

    probs: np.ndarray
    baseline: np.ndarray
    atlas_vote: np.ndarray  # majority vote of the K registered atlas labels (before fine-tuning), as one-hot
    qa: dict
    seconds: dict[str, float]
    # probabilities on the region of interest (centred at `center`) of each ingredient of the final mask:
    # baseline (the starting mask), ema (moving average incl. the final prediction), network (final tuned
    # prediction), atlas (fusion)
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    center: tuple[int, ...] = ()
    start: np.ndarray | None = None  # (L, z, y, x) the starting mask on the whole grid (outside the ROI it stands)

    def part_on_grid(self, name: str) -> np.ndarray:
        """One ingredient of the final mask (`parts`) pasted into the starting mask: its whole-grid form."""
        return paste(self.start.copy(), self.parts[name], self.center)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def _silent(stage: str, fraction: float) -> None:
    pass


class Refiner:
    """Holds a bundle and its atlases in memory (load once per worker) and refines scans."""

    def __init__(self, bundle: ISLBundle, atlases: Atlases, cfg: ISLConfig, device: torch.device):
        self.bundle, self.cfg, self.device = bundle, cfg, device
        self.net = bundle.segmentation.network.to(device).eval()
        self.pre = bundle.segmentation.preprocessing
        self.aligner = Aligner(bundle.registrar.to(device).eval(), atlases, device, self.pre.spacing)
        labels = bundle.segmentation.labels
        names = [n for v, n in labels.items() if v != 0]
        unknown = sorted((set(cfg.keep_start) | set(cfg.label_fusion_weights)) - set(names))
        if unknown:
            raise InputError(f"keep_start / label_fusion_weights name {unknown}, which model {bundle.version} does "
                             f"not segment (its labels: {', '.join(names)})")
        # why this method: the bundle's configuration decision (what `isl train` measured), for every report
        self.decision = bundle.info.decision.model_dump(exclude_unset=True)

    def refine(self, image: np.ndarray, progress=None, extra_atlases: Atlases | None = None) -> ISLResult:
        """Run ISL on one preprocessed image (C, z, y, x) on the canonical grid. `progress(stage, fraction)`, when
        given, is called as the work advances (fraction of the whole, 0..1); an exception it raises aborts.
        `extra_atlases` join the bundle's atlases for this scan (radiologists' corrections)."""
        cfg, timer, report = self.cfg, Timer(), progress or _silent
        rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        report("baseline", 0.0)
        if cfg.method != "isl":
            return self._peer(image, timer)
        with timer.stage("baseline"):
            start = initial_mask(self.net, image, self.pre, cfg.mask_flips, self.device)
        report("registration", 0.05)
        aligner = self.aligner.with_atlases(extra_atlases)
        with timer.stage("registration"):
            aligner, transforms = aligner.global_stage(start.scan, start.mask, cfg.affine)
            aligned = aligner.register(start.scan, start.mask, cfg.atlases, cfg.registration)
            vote, folding = majority_vote(aligned.labels, aligned.known), folding_fraction(aligned.displacement)
        report("finetune", 0.3)
        tuned = finetune(self.net, start, aligned, aligner, cfg, rng, timer, report)
        report("fusion", 0.85)
        with timer.stage("fusion"):
            fused = tuned.fused if tuned.fused is not None else fuse(
                tuned.aligned, start.scan, cfg.fusion_beta, cfg.fusion_window, cfg.fusion_search)
        report("final", 0.95)
        with timer.stage("final"):
            weights, keep = self._per_label()
            probs, network, safety = final_mix(tuned.network, start, fused, weights, cfg.final_flips,
                                               cfg.min_agreement, keep, cfg.final_inference)
            tuned.ema.update(network)
        qa = self._qa(start, tuned, probs, folding, [aligner.ids[int(i)] for i in aligned.index]) | {
            "safety": self._labelled(safety)} | _global_qa(transforms, cfg)
        parts = {"baseline": start.mask, "ema": tuned.ema.probs, "network": network, "atlas": fused}
        return ISLResult(probs, start.baseline, roi_onehot_on(start.baseline, vote, start.center), qa,
                         timer.seconds, parts, tuple(start.center), start.start)

    def _per_label(self) -> tuple[np.ndarray, np.ndarray]:
        """(fusion weight per label, labels kept as the starting mask) of the final mix, from the config."""
        cfg, labels = self.cfg, self.bundle.segmentation.labels
        weights = np.array([cfg.fusion_weight] + [cfg.label_fusion_weights.get(labels[v], cfg.fusion_weight)
                                                  for v in range(1, len(labels))])
        return weights, np.array([v != 0 and labels[v] in cfg.keep_start for v in range(len(labels))])

    def _peer(self, image: np.ndarray, timer: Timer) -> ISLResult:
        """The configured method is the network's own mask (flip-averaged or plain): no atlases, no fine-tuning."""
        with timer.stage("baseline"):
            start = initial_mask(self.net, image, self.pre, self.cfg.method == "tta_flip", self.device)
        qa = {"method": self.cfg.method, "configuration": self.decision, "atlases_used": [], "finetune_steps": 0,
              "roi_center_voxel": list(start.center),
              "baseline_vs_refined_dice": mean_dice(start.baseline.argmax(0), start.start.argmax(0))}
        vote = np.eye(len(start.baseline), dtype=np.float32)[start.baseline.argmax(0)].transpose(3, 0, 1, 2)
        return ISLResult(start.start, start.baseline, vote, qa, timer.seconds, {}, tuple(start.center), start.start)

    def _labelled(self, safety: dict) -> dict:
        """The safety QA with label names instead of positions."""
        names = [n for v, n in self.bundle.segmentation.labels.items() if v != 0]
        out = {k: dict(zip(names, v)) for k, v in safety.items() if k != "weights"}
        out["weights"] = {part: dict(zip(names, w)) for part, w in safety["weights"].items()}
        out["min_agreement"] = self.cfg.min_agreement
        out["labels_left_as_start"] = list(self.cfg.keep_start)
        return out

    def _qa(self, start: Start, tuned: Tuned, probs: np.ndarray, folding: float, used: list[str]) -> dict:
        return {"method": "isl", "configuration": self.decision,
                "atlases_used": used,
                "atlases_from_corrections": [a for a in used if a.startswith(CORRECTION_PREFIX)],
                "finetune_steps": tuned.steps,
                "stopped_early": tuned.steps < self.cfg.finetune_steps,
                "ema_changes": [round(c, 5) for c in tuned.ema.changes], "folding_fraction": folding,
                "roi_center_voxel": list(start.center),
                "baseline_vs_refined_dice": mean_dice(start.baseline.argmax(0), probs.argmax(0))}


def _global_qa(transforms: dict, cfg: ISLConfig) -> dict:
    """The report's part on the atlases' global transforms (none when the config has no global stage): each
    atlas's scale, rotation and translation, those left out as implausible, and whether the stage was applied (not
    when no atlas's transform was plausible: then every atlas went on as cropped)."""
    if not transforms:
        return {}
    implausible = [a for a, d in transforms.items() if not d["plausible"]]
    applied = len(implausible) < len(transforms)
    return {"global_alignment": {"kind": cfg.affine.kind, "max_scale": cfg.affine.max_scale,
                                 "max_rotation_deg": cfg.affine.max_rotation, "applied": applied,
                                 "atlases": transforms, "left_out_as_implausible": implausible if applied else []}}


def load_refiner(model_dir: str | Path, atlas_dir: str | Path | None, cfg: ISLConfig | dict | None = None) -> Refiner:
    """Load a bundle and its atlases once; the Refiner then serves any number of scans. `cfg`: None for the
    configuration `isl train` chose for the bundle, a dict of fields to override in it, or a whole ISLConfig."""
    if isinstance(cfg, ISLConfig):
        dev = pick_device(cfg.device)
        bundle = ISLBundle.load(model_dir, dev)
    else:
        bundle = ISLBundle.load(model_dir, "cpu")
        cfg = bundle.refinement_config(cfg)
        dev = pick_device(cfg.device)
        bundle.segmentation.network.to(dev)
        bundle.registrar.to(dev)
    return Refiner(bundle, bundle.load_atlases(atlas_dir, context=cfg.affine.kind != "none"), cfg, dev)
