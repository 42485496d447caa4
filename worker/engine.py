"""Inference-specific learning on one scan (Chen et al., Medical Physics 2025), composed from the
segmentation and registration packages:

1. baseline probabilities of the initial network; the ROI is centred on its mask;
2. every atlas is registered toward the scan by the learned network, the K most similar are kept;
3. their velocities are instance-optimised with the weak-supervision Dice to the scan's current mask;
4. a copy of the network is fine-tuned on the K deformed atlases; the scan's mask is an exponential
   moving average (EMA) of its predictions, fed back into re-registration, until the mask stops changing;
5. the final mask mixes the tuned network's prediction with the fusion of the warped atlas labels,
   each atlas weighted per voxel by its local similarity to the scan, and goes back to the native grid.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from registration.fusion import fuse_labels
from registration.instance import folding_fraction, instance_optimise
from registration.model import Losses
from segmentation.augment import augmentation
from segmentation.infer import predict, predict_logits
from segmentation.preprocess import centroid, crop, paste
from worker.bundle import Atlases, ISLBundle
from worker.config import ISLConfig


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class ISLResult:
    """Probabilities (L, z, y, x) on the canonical grid, for the refined mask and the peers it yields for free."""

    probs: np.ndarray
    baseline: np.ndarray
    atlas_vote: np.ndarray  # majority vote of the K registered atlas labels (before fine-tuning), as one-hot
    qa: dict
    seconds: dict[str, float]
    # probabilities on the region of interest (centred at `center`) of each ingredient of the final mask:
    # baseline, ema (moving average incl. the final prediction), network (final tuned prediction), atlas (fusion)
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    center: tuple[int, ...] = ()


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean foreground Dice of two label maps over the labels present in either."""
    labels = [v for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
    if not labels:
        return 1.0
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]))


class EMAMask:
    """Exponential moving average of class probabilities with the stopping rule: stop once the argmax
    mask changed by less than `tolerance` (1 - Dice) for `patience` consecutive updates."""

    def __init__(self, probs: np.ndarray, decay: float, tolerance: float, patience: int):
        self.probs, self.decay, self.tolerance, self.patience = probs.copy(), decay, tolerance, patience
        self.calm, self.changes = 0, []

    def update(self, probs: np.ndarray) -> bool:
        """Fold in one prediction; True when the stopping rule fires."""
        before = self.probs.argmax(0)
        self.probs = self.decay * self.probs + (1.0 - self.decay) * probs
        change = 1.0 - mask_dice(before, self.probs.argmax(0))
        self.changes.append(change)
        self.calm = self.calm + 1 if change < self.tolerance else 0
        return self.calm >= self.patience


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from segmentation.errors import InputError

        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


class Refiner:
    """Holds a bundle and its atlases in memory (load once per worker) and refines scans."""

    def __init__(self, bundle: ISLBundle, atlases: Atlases, cfg: ISLConfig, device: torch.device):
        self.bundle, self.cfg, self.device = bundle, cfg, device
        self.net = bundle.segmentation.network.to(device).eval()
        self.reg = bundle.registrar.to(device).eval()
        self.pre = bundle.segmentation.preprocessing
        self.atlas_images = atlases.images.to(device)
        self.atlas_onehot = atlases.onehot.to(device)
        self.atlas_ids = atlases.case_ids
        self.losses = Losses(self.reg.cfg.ncc_window)

    # -- registration ---------------------------------------------------------------------------------
    def _select(self, scan: torch.Tensor, fg: torch.Tensor, k: int):
        """Register every atlas with the network; keep the k with the best image + label agreement."""
        with torch.no_grad():
            vs, scores = [], []
            for i in range(0, len(self.atlas_images), 8):
                imgs, labs = self.atlas_images[i:i + 8], self.atlas_onehot[i:i + 8, 1:]
                v = self.reg.velocity(imgs[:, :1], scan.expand(len(imgs), -1, -1, -1, -1))
                disp = self.reg.displacement(v, scan.shape[2:])
                image_loss = self.losses.image(self.reg.warp(imgs[:, :1], disp), scan.expand(len(imgs), -1, -1, -1, -1))
                label_loss = self.losses.overlap(self.reg.warp(labs, disp), fg.expand(len(imgs), -1, -1, -1, -1))
                vs.append(v)
                scores.append(-(image_loss + label_loss))
        order = torch.argsort(torch.cat(scores), descending=True)[:k]
        with torch.no_grad():
            return order, self.reg.integrate(torch.cat(vs)[order])

    def _warp_atlases(self, index, coarse_disp, shape):
        with torch.no_grad():
            disp = self.reg.upsample(coarse_disp, shape)
            return self.reg.warp(self.atlas_images[index], disp), self.reg.warp(self.atlas_onehot[index], disp), disp

    # -- fine-tuning ------------------------------------------------------------------------------------
    def _fuse(self, w_img: torch.Tensor, w_lab: torch.Tensor, scan: torch.Tensor) -> np.ndarray:
        """Fused probabilities (L, ...) of the warped atlas labels (K, L, ...); see registration.fusion."""
        lab = w_lab.clone()
        lab[:, 0] += 1.0 - lab.sum(1)  # warping pads with zeros: what left the atlas grid is background
        cfg = self.cfg
        return fuse_labels(w_img, lab, scan, cfg.fusion_beta, cfg.fusion_window, cfg.fusion_search).cpu().numpy()

    def _finetune_batch(self, images, onehot, transform, rng, scan=None, target=None):
        """A batch of augmented deformed atlases, plus the augmented scan with its confident pseudo-label
        (`target`: (1, z, y, x) class indices, L where not confident) when given."""
        xs, ys = [], []
        for i in rng.integers(0, len(images), size=self.cfg.finetune_batch):
            label = onehot[i].argmax(0, keepdim=True)
            sample = transform({"image": images[i].cpu(), "label": label.cpu()})
            xs.append(torch.as_tensor(sample["image"]))
            ys.append(torch.as_tensor(sample["label"]))
        if scan is not None:
            sample = transform({"image": scan.cpu(), "label": target})
            xs.append(torch.as_tensor(sample["image"]))
            ys.append(torch.as_tensor(sample["label"]))
        return torch.stack(xs).float().to(self.device), torch.stack(ys).long().to(self.device)

    def _pseudo_label(self, ema: np.ndarray, fused: np.ndarray) -> torch.Tensor:
        """The current estimate's class where it is confident, L (ignored) elsewhere."""
        w = self.cfg.fusion_weight
        estimate = (1 - w) * ema + w * fused
        target = estimate.argmax(0)
        target[estimate.max(0) < self.cfg.pseudo_confidence] = len(estimate)
        return torch.from_numpy(target[None].astype(np.float32))

    def refine(self, image: np.ndarray, progress=None) -> ISLResult:
        """Run ISL on one preprocessed image (C, z, y, x) on the canonical grid. `progress(stage, fraction)`, when
        given, is called as the work advances (fraction of the whole, 0..1); an exception it raises aborts."""
        cfg, timer = self.cfg, Timer()
        report = progress or (lambda stage, fraction: None)
        report("baseline", 0.0)
        rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        with timer.stage("baseline"):
            baseline = predict(self.net, image, self.pre.patch_size, self.device)
            center = centroid(baseline.argmax(0) > 0)
            roi = self.pre.roi_size
            x_roi = torch.from_numpy(crop(image, center, roi))[None].to(self.device)
            start = predict(self.net, image, self.pre.patch_size, self.device, flips=True) if cfg.mask_flips else baseline
            p_roi = crop(start, center, roi)
            p_roi[0][crop(np.ones(image.shape[1:], bool), center, roi) == 0] = 1.0  # outside the image is background
            scan = x_roi[:, :1]
        report("registration", 0.05)
        with timer.stage("registration"):
            k = min(cfg.atlases, len(self.atlas_ids))
            mask = torch.from_numpy(p_roi[1:])[None].to(self.device)
            index, u0 = self._select(scan, mask, k)
            field = instance_optimise(self.reg, self.atlas_images[index, :1], self.atlas_onehot[index, 1:], scan,
                                      mask, u0, cfg.registration)
            w_img, w_lab, disp = self._warp_atlases(index, field, scan.shape[2:])
            n_labels = w_lab.shape[1]
            votes = torch.nn.functional.one_hot(w_lab.argmax(1), n_labels).sum(0)  # (z, y, x, L)
            atlas_vote = torch.nn.functional.one_hot(votes.argmax(-1), n_labels).permute(3, 0, 1, 2).float().cpu().numpy()
            folding = folding_fraction(disp)
        report("finetune", 0.3)
        ema = EMAMask(p_roi, cfg.ema_decay, cfg.stop_tolerance, cfg.stop_patience)
        steps = 0
        with timer.stage("finetune"):
            tuned = copy.deepcopy(self.net).to(self.device)
            opt = torch.optim.Adam(tuned.parameters(), lr=cfg.finetune_lr)
            from monai.losses import DiceCELoss

            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            transform = augmentation(roi, crop=False, strength=cfg.augment_strength)
            transform.set_random_state(seed=cfg.seed)
            fused = self._fuse(w_img, w_lab, scan) if cfg.scan_weight > 0 else None  # the pseudo-label needs it
            for steps in range(1, cfg.finetune_steps + 1):
                tuned.train()
                if cfg.scan_weight > 0:
                    target = self._pseudo_label(ema.probs, fused)
                    xb, yb = self._finetune_batch(w_img, w_lab, transform, rng, x_roi[0], target)
                    logits = tuned(xb)
                    n = cfg.finetune_batch
                    loss = loss_fn(logits[:n], yb[:n]) + cfg.scan_weight * torch.nn.functional.cross_entropy(
                        logits[n:], yb[n:, 0], ignore_index=n_labels)
                else:
                    xb, yb = self._finetune_batch(w_img, w_lab, transform, rng)
                    loss = loss_fn(tuned(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                report("finetune", 0.3 + 0.55 * steps / max(cfg.finetune_steps, 1))
                if steps % cfg.predict_every == 0:
                    p = predict_logits(tuned, x_roi, roi)[0].cpu().numpy()
                    if ema.update(p) and steps >= cfg.min_steps:
                        break
                if cfg.reregister_steps and steps % cfg.reregister_every == 0 and steps < cfg.finetune_steps:
                    with timer.stage("reregistration"):
                        fb = cfg.registration.model_copy(update={"steps": cfg.reregister_steps})
                        mask = torch.from_numpy(ema.probs[1:])[None].to(self.device)
                        field = instance_optimise(self.reg, self.atlas_images[index, :1], self.atlas_onehot[index, 1:],
                                                  scan, mask, field, fb)
                        w_img, w_lab, disp = self._warp_atlases(index, field, scan.shape[2:])
                        fused = self._fuse(w_img, w_lab, scan) if cfg.scan_weight > 0 else None
        report("fusion", 0.85)
        with timer.stage("fusion"):
            if fused is None:
                fused = self._fuse(w_img, w_lab, scan)
        report("final", 0.95)
        with timer.stage("final"):
            final_net = predict_logits(tuned, x_roi, roi, flips=cfg.final_flips)[0].cpu().numpy()
            ema.update(final_net)
            refined_roi = (1 - cfg.fusion_weight) * final_net + cfg.fusion_weight * fused
            probs = paste(start.copy(), refined_roi, center)  # outside the ROI: the starting mask (flip-averaged)
            vote_full = paste(np.eye(len(baseline), dtype=np.float32)[baseline.argmax(0)].transpose(3, 0, 1, 2), atlas_vote, center)
        timer.seconds["reregistration"] = timer.seconds.get("reregistration", 0.0)
        timer.seconds["finetune"] -= timer.seconds["reregistration"]
        qa = {"atlases_used": [self.atlas_ids[int(i)] for i in index], "finetune_steps": steps,
              "stopped_early": steps < cfg.finetune_steps, "ema_changes": [round(c, 5) for c in ema.changes],
              "folding_fraction": folding, "roi_center_voxel": list(center),
              "baseline_vs_refined_dice": mask_dice(baseline.argmax(0), probs.argmax(0))}
        parts = {"baseline": p_roi, "ema": ema.probs, "network": final_net, "atlas": fused}
        return ISLResult(probs, baseline, vote_full, qa, timer.seconds, parts, tuple(center))
