"""The scan's mask from start to end: the initial network's baseline and the starting mask in the region of
interest (step 1 of the method), the exponential moving average of the fine-tuned network's predictions with
its stopping rule (step 3), and the final mix pasted back onto the whole scan (step 4)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imaging.metrics import dice, mean_dice
from segmentation.infer import predict, predict_probs
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
    whole: np.ndarray | None = None  # (C, z, y, x) the scan on the whole grid
    patch_size: tuple[int, ...] = ()  # the network's sliding-window patch

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
    return Start(baseline, start, center, x_roi, _crop_probs(start, center, roi), tuple(pre.mirror_axes), image,
                 tuple(pre.patch_size))


def _crop_probs(probs: np.ndarray, center, roi) -> np.ndarray:
    """Whole-grid probabilities cropped to the ROI; where the ROI leaves the image, background."""
    out = crop(probs, center, roi)
    out[0][crop(np.ones(probs.shape[1:], bool), center, roi) == 0] = 1.0
    return out


def predict_roi(net, start: Start, flips: bool, where: str = "scan") -> np.ndarray:
    """A (tuned) network's probabilities in the ROI (L, *roi).

    `where="scan"`: inferred as the baseline is, by sliding windows over the whole scan, then cropped; so the
    untuned network gives exactly the starting mask. Inferred on the ROI alone, the network sees no context
    beyond its edges and loses the overlapping windows' averaging: on head-and-neck CT, whose ROI is a thin share
    of the scan, the untuned network scored 0.9 Dice points under its own baseline that way.
    `where="roi"`: one pass over the ROI crop, which is what the network was fine-tuned on: on the hippocampus
    crops the tuned network scored higher so (hippocampus_006: 0.9091 vs 0.9006). Which one a bundle uses is
    decided by `isl train`'s configuration on its own validation cases (`ISLConfig.final_inference`)."""
    axes = start.mirror_axes if flips else False
    if where == "roi":
        return predict_probs(net, start.image, start.mask.shape[1:], flips=axes)[0].cpu().numpy()
    probs = predict(net, start.whole, start.patch_size, start.image.device, flips=axes)
    return _crop_probs(probs, start.center, start.mask.shape[1:])


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


def safe_mix(start: np.ndarray, network: np.ndarray, fused: np.ndarray, fusion_weight: float | np.ndarray,
             min_agreement: float, agreements: tuple[np.ndarray, np.ndarray] | None = None,
             keep: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """(1 - w) x network + w x fused, with the per-case safety: a label whose fusion (or tuned network) agrees with
    the starting mask by a Dice under `min_agreement` takes the starting mask's probability in its place for that
    label; the mix is renormalised per voxel. Returns the ROI probabilities and, per label, the agreements and the
    weights used (QA). `agreements`: (fusion, network) vs start, when already computed.

    `fusion_weight` may be one per label (L,; the first, background's, applies where no label is found): each
    label is then found where the mix made with ITS weight (on every channel) says it, so that each organ ends
    exactly as a mix with its own weight would draw it (where two claim a voxel, the more probable wins; a voxel
    no label claims is background, with the soft values of the mix most sure of it). Labels flagged in `keep`
    (L,) stay exactly as the starting mask has them: wherever the start or the mix says a kept label, the voxel
    takes the start's probabilities."""
    agree_fused, agree_net = agreements or (agreement(fused, start), agreement(network, start))
    n = len(start)
    keep = np.zeros(n, bool) if keep is None else np.asarray(keep, bool)
    weights = np.broadcast_to(np.asarray(fusion_weight, np.float64), (n,))
    ok_fused, ok_net = (agree_fused >= min_agreement) & ~keep, (agree_net >= min_agreement) & ~keep
    shape = (-1,) + (1,) * (start.ndim - 1)

    def mix(w: float) -> np.ndarray:
        wf, wn = np.where(ok_fused, w, 0.0), np.where(ok_net, 1.0 - w, 0.0)
        out = wf.reshape(shape) * fused + wn.reshape(shape) * network + (1.0 - wf - wn).reshape(shape) * start
        return out / np.maximum(out.sum(0, keepdims=True), 1e-8) if min_agreement > 0 or keep.any() else out

    own = {float(w): mix(float(w)) for w in np.unique(weights)}
    if len(own) == 1:
        mixed = own[float(weights[0])]
    else:
        mixed, best = own[float(weights[0])].copy(), np.full(start.shape[1:], -1.0, np.float32)
        for v in range(1, n):
            m = own[float(weights[v])]
            claim = (m.argmax(0) == v) & (m[v] > best)
            mixed[:, claim], best[claim] = m[:, claim], m[v][claim]
        unclaimed, mixes = best < 0, list(own.values())
        surest = np.stack([m[0] for m in mixes]).argmax(0)
        for i, m in enumerate(mixes):
            sel = unclaimed & (surest == i)
            mixed[:, sel] = m[:, sel]
        p = mixed[:, unclaimed]  # no label's own mix says a label here: background, its soft values kept
        p[1:] *= np.minimum(1.0, 0.999 * p[0] / np.maximum(p[1:].max(0), 1e-8))
        mixed[:, unclaimed] = p / np.maximum(p.sum(0, keepdims=True), 1e-8)
    if keep.any():
        revert = keep[start.argmax(0)] | keep[mixed.argmax(0)]
        mixed[:, revert] = start[:, revert]
    w_fused, w_net = np.where(ok_fused, weights, 0.0), np.where(ok_net, 1.0 - weights, 0.0)
    qa = {"fusion_vs_start_dice": agree_fused[1:].round(4).tolist(),
          "network_vs_start_dice": agree_net[1:].round(4).tolist(),
          "weights": {"fusion": w_fused[1:].round(3).tolist(), "network": w_net[1:].round(3).tolist(),
                      "start": (1.0 - w_fused - w_net)[1:].round(3).tolist()}}
    return mixed.astype(np.float32), qa


def final_mix(tuned, start: Start, fused: np.ndarray, fusion_weight: float | np.ndarray, flips: bool,
              min_agreement: float = 0.0, keep: np.ndarray | None = None,
              where: str = "scan") -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 4: (1 - w) x the tuned network's prediction (flip-averaged when `flips`) + w x the fused warped atlas
    labels in the ROI, label by label under the per-case safety of `safe_mix`, pasted into the starting mask
    (which stands outside the ROI). Returns the whole-grid probabilities, the tuned network's own ROI
    prediction and the safety QA. `keep`: see `safe_mix`; `where`: see `predict_roi`."""
    network = predict_roi(tuned, start, flips, where)
    refined_roi, safety = safe_mix(start.mask, network, fused, fusion_weight, min_agreement, keep=keep)
    return paste(start.start.copy(), refined_roi, start.center), network, safety


def roi_onehot_on(baseline: np.ndarray, roi_onehot: np.ndarray, center) -> np.ndarray:
    """A one-hot ROI result (L, *roi) pasted into the one-hot of the baseline's mask (the peers' whole-grid form)."""
    whole = np.eye(len(baseline), dtype=np.float32)[baseline.argmax(0)].transpose(3, 0, 1, 2)
    return paste(whole, roi_onehot, center)
