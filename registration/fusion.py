"""Multi-atlas label fusion of warped atlas labels, weighted per voxel by local similarity to the scan."""
from __future__ import annotations

import itertools

import torch


def _box(x: torch.Tensor, window: int) -> torch.Tensor:
    from neurite.nn.functional import box_filter

    return box_filter(x, window_size=window)


def _scan_moments(scan: torch.Tensor, window: int) -> tuple[torch.Tensor, ...]:
    """The scan's side of the local NCC, computed once: the scan in float64, the voxel count, sum and variance
    (times the count) of each `window`^3 patch (fewer voxels near the border: zero padding)."""
    b = scan.clamp(0, 1).double()
    n = _box(torch.ones_like(b), window)
    sb = _box(b, window)
    var_b = (_box(b * b, window) - sb * sb / n).clamp_min(0)
    return b, n, sb, var_b


def _local_ncc(a: torch.Tensor, moments: tuple[torch.Tensor, ...], window: int, eps: float = 1e-5) -> torch.Tensor:
    """Local correlation coefficient (K, 1, ...) of images `a` (K, 1, ..., float64 in [0, 1]) with the scan whose
    `_scan_moments` are given, from neurite's box-filtered moments (its NCC module only returns the spatial mean)."""
    b, n, sb, var_b = moments
    sa, saa, sab = _box(torch.cat([a, a * a, a * b.expand_as(a)], 1), window).chunk(3, dim=1)
    cross = sab - sa * sb / n
    var_a = (saa - sa * sa / n).clamp_min(0)
    return cross / torch.sqrt(var_a * var_b + eps)


def local_similarity(warped: torch.Tensor, scan: torch.Tensor, window: int) -> torch.Tensor:
    """Local correlation coefficient map (K, 1, ...) in [-1, 1] of each warped atlas image (K, 1, ...) with the
    scan (1, 1, ...), in float64 as Losses.image; returned as float32."""
    with torch.no_grad():
        return _local_ncc(warped.clamp(0, 1).double(), _scan_moments(scan, window), window).float()


def fuse_labels(images: torch.Tensor, labels: torch.Tensor, scan: torch.Tensor, beta: float, window: int,
                search: int = 0, known: torch.Tensor | None = None) -> torch.Tensor:
    """Fused class probabilities (L, ...) of warped atlas labels (K, L, ...) (each voxel's classes summing to 1)
    given the warped atlas images (K, 1, ...) and the scan (1, 1, ...).

    Each atlas votes at each voxel with weight softmax(beta * local NCC of its image with the scan in a
    `window`^3 patch); beta = 0 is the plain mean (soft majority vote). With a search radius r > 0 the softmax
    also runs over the atlas voxels up to r away along each axis, each weighed by the NCC of its own patch:
    non-local patch-based label fusion (Coupe et al., NeuroImage 2011), which absorbs the last voxel of
    misregistration that a smooth deformation leaves.

    Partial labels: `known` (K, L) bool says which labels each atlas contours. A label's probability is then the
    weighted vote of the atlases that contour it only, and background is what the labels leave (an atlas
    without the larynx says nothing about where the larynx is)."""
    partial = known is not None and not bool(known.all())
    if beta == 0 and not partial:
        return labels.mean(0)
    search = search if beta else 0  # beta 0 is the plain mean of the atlases' own voxels
    with torch.no_grad():
        moments = _scan_moments(scan, window)
        shape = labels.shape[2:]
        pad = (search,) * 6
        img_p = torch.nn.functional.pad(images[:, :1].clamp(0, 1).double(), pad, mode="replicate")
        lab_p = torch.nn.functional.pad(labels, pad, mode="replicate") if search else labels
        num = torch.zeros(labels.shape[1:], dtype=torch.float64, device=labels.device)
        den = torch.zeros((labels.shape[1] if partial else 1, *shape), dtype=torch.float64, device=labels.device)
        mask = known.double()[(...,) + (None,) * 3] if partial else 1.0  # (K, L, 1, 1, 1)
        for dz, dy, dx in itertools.product(range(2 * search + 1), repeat=3):
            at = (..., slice(dz, dz + shape[0]), slice(dy, dy + shape[1]), slice(dx, dx + shape[2]))
            sim = _local_ncc(img_p[at], moments, window)
            weight = torch.exp(beta * (sim - 1.0))  # softmax numerator shifted by NCC's upper bound 1; float64
            num += (weight * mask * lab_p[at]).sum(0)
            den += (weight * mask).sum(0)
        if not partial:
            return (num / den).to(labels.dtype)
        probs = num / den.clamp_min(1e-12)
        fg = probs[1:].sum(0, keepdim=True)
        probs = torch.cat([(1.0 - fg).clamp_min(0), probs[1:]]) / torch.maximum(fg, torch.ones_like(fg))
        return probs.to(labels.dtype)
