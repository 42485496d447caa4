"""The scan's mask from start to end: the initial network's baseline and the starting mask in the region of
interest (step 1 of the method), the exponential moving average of the fine-tuned network's predictions with
its stopping rule (step 3), and the final mix pasted back onto the whole scan (step 4)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from segmentation.infer import predict, predict_probs
from segmentation.metrics import dice, mean_dice
from segmentation.preprocess import Preprocessing, centroid, crop, paste


@dataclass
class Start:
    """Step 1: what the initial network says of the scan, and the region of interest around it."""

    baseline: np.ndarray  # (L, z, y, x) probabilities of the initial network, whole canonical grid
    start: np.ndarray  # (L, z, y, x) the starting mask (baseline averaged over 8 mirror flips), whole grid
    center: tuple[int, ...]  # ROI centre (voxels): the starting mask's centre of mass
    image: torch.Tensor  # (1, C, *roi) the scan in the ROI
    mask: np.ndarray  # (L, *roi) the starting mask in the ROI (outside the image: background)
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # the model's (Preprocessing.mirror_axes)

    @property
    def scan(self) -> torch.Tensor:
        """(1, 1, *roi): the first channel, which registration aligns to."""
        return self.image[:, :1]


def initial_mask(net, image: np.ndarray, pre: Preprocessing, flips: bool, device: torch.device) -> Start:
    """Baseline probabilities, the ROI centred on their mask, and the starting mask: the baseline averaged over
    8 mirror flips when `flips` (the weak supervision and the moving average start from it)."""
    baseline = predict(net, image, pre.patch_size, device)
    center = centroid(baseline.argmax(0) > 0)
    roi = pre.roi_size
    x_roi = torch.from_numpy(crop(image, center, roi))[None].to(device)
    start = predict(net, image, pre.patch_size, device, flips=pre.mirror_axes) if flips else baseline
    p_roi = crop(start, center, roi)
    p_roi[0][crop(np.ones(image.shape[1:], bool), center, roi) == 0] = 1.0  # outside the image is background
    return Start(baseline, start, center, x_roi, p_roi, tuple(pre.mirror_axes))


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
        change = 1.0 - mean_dice(before, self.probs.argmax(0))
        self.changes.append(change)
        self.calm = self.calm + 1 if change < self.tolerance else 0
        return self.calm >= self.patience


def agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(L,) Dice of the argmax masks of two probability maps (L, ...) per label (background: 1.0)."""
    la, lb = a.argmax(0), b.argmax(0)
    return np.array([1.0] + list(dice(la, lb, range(1, len(a))).values()))


def safe_mix(start: np.ndarray, network: np.ndarray, fused: np.ndarray, fusion_weight: float,
             min_agreement: float, agreements: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """(1 - w) x network + w x fused per label, with the per-case safety: a label whose fusion (or tuned network)
    agrees with the starting mask by a Dice under `min_agreement` takes the starting mask's probability in its
    place for that label; the mix is renormalised per voxel. Returns the ROI probabilities and, per label, the
    agreements and the weights used (QA). `agreements`: (fusion, network) vs start, when already computed."""
    agree_fused, agree_net = agreements or (agreement(fused, start), agreement(network, start))
    ok_fused, ok_net = agree_fused >= min_agreement, agree_net >= min_agreement
    w_fused = np.where(ok_fused, fusion_weight, 0.0)
    w_net = np.where(ok_net, 1.0 - fusion_weight, 0.0)
    w_start = 1.0 - w_fused - w_net
    shape = (-1,) + (1,) * (start.ndim - 1)
    mixed = w_fused.reshape(shape) * fused + w_net.reshape(shape) * network + w_start.reshape(shape) * start
    if min_agreement > 0:
        mixed = mixed / np.maximum(mixed.sum(0, keepdims=True), 1e-8)
    qa = {"fusion_vs_start_dice": agree_fused[1:].round(4).tolist(),
          "network_vs_start_dice": agree_net[1:].round(4).tolist(),
          "weights": {"fusion": w_fused[1:].round(3).tolist(), "network": w_net[1:].round(3).tolist(),
                      "start": w_start[1:].round(3).tolist()}}
    return mixed.astype(np.float32), qa


def final_mix(tuned, start: Start, fused: np.ndarray, fusion_weight: float, flips: bool,
              min_agreement: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 4: (1 - w) x the tuned network's prediction (flip-averaged when `flips`) + w x the fused warped atlas
    labels in the ROI, label by label under the per-case safety of `safe_mix`, pasted into the starting mask
    (which stands outside the ROI). Returns the whole-grid probabilities, the tuned network's own ROI
    prediction and the safety QA."""
    network = predict_probs(tuned, start.image, start.mask.shape[1:],
                            flips=start.mirror_axes if flips else False)[0].cpu().numpy()
    refined_roi, safety = safe_mix(start.mask, network, fused, fusion_weight, min_agreement)
    return paste(start.start.copy(), refined_roi, start.center), network, safety


def roi_onehot_on(baseline: np.ndarray, roi_onehot: np.ndarray, center) -> np.ndarray:
    """A one-hot ROI result (L, *roi) pasted into the one-hot of the baseline's mask (the peers' whole-grid form)."""
    whole = np.eye(len(baseline), dtype=np.float32)[baseline.argmax(0)].transpose(3, 0, 1, 2)
    return paste(whole, roi_onehot, center)
