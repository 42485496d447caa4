"""The segmentation loss: MONAI's DiceCE, and its marginal form for partially labelled cases.

A case whose label map leaves a structure out (not contoured) says nothing about where that structure is:
its voxels carry background. The marginal loss (Shi et al., Medical Image Analysis 2021; Fang & Yan, IEEE TMI
2020) merges the probability of every structure the case does not annotate into background before the
cross-entropy, and leaves those structures out of the Dice, so the network is never taught that they are
background."""
from __future__ import annotations

import torch


def marginal_dice_ce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                     smooth: float = 1e-5) -> torch.Tensor:
    """DiceCE of `logits` (B, L, ...) against class indices `target` (B, 1, ...), where `annotated` (B, L) bool
    says which labels each sample's map contours (background always). Equals MONAI's
    `DiceCELoss(to_onehot_y=True, softmax=True)` when every label is annotated (which then computes it)."""
    from monai.losses import DiceCELoss

    if bool(annotated.all()):
        return DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    return _marginal(logits, target, annotated, smooth)


def _marginal(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, smooth: float) -> torch.Tensor:
    n_labels = logits.shape[1]
    known = annotated.to(logits.dtype)[(...,) + (None,) * (logits.dim() - 2)]  # (B, L, 1, 1, 1)
    probs = torch.softmax(logits, 1)
    unknown_mass = (probs * (1 - known)).sum(1)
    merged = probs * known
    merged = torch.cat([merged[:, :1] + unknown_mass[:, None], merged[:, 1:]], 1)
    onehot = torch.nn.functional.one_hot(target[:, 0].long(), n_labels).movedim(-1, 1).to(logits.dtype)
    ce = -(onehot * torch.log(merged.clamp_min(1e-7))).sum(1).mean()
    dims = tuple(range(2, logits.dim()))
    inter, total = (merged * onehot).sum(dims), merged.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (total + smooth)  # (B, L)
    weights = annotated.to(logits.dtype)
    return ce + (dice * weights).sum() / weights.sum()
