"""Training the registration network on pairs of labelled cases:
(1 - NCC) + w_dice * (1 - Dice(warped moving label, fixed label)) + w_smooth * |grad v|^2."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from registration.model import Losses, Registrar

log = logging.getLogger(__name__)


def _pair_batch(images: torch.Tensor, onehots: torch.Tensor, known: torch.Tensor, rng: np.random.Generator, n: int):
    i = rng.integers(0, len(images), size=n)
    j = (i + rng.integers(1, len(images), size=n)) % len(images)  # never a case with itself
    src, tgt, src_lab, tgt_lab = images[i], images[j], onehots[i], onehots[j]
    for axis in (2, 3, 4):  # the same mirror on both sides keeps pairs anatomical while adding variety
        if rng.random() < 0.5:
            src, tgt, src_lab, tgt_lab = (t.flip(axis) for t in (src, tgt, src_lab, tgt_lab))
    return src, tgt, src_lab, tgt_lab, known[i] & known[j]


def train_registration(reg: Registrar, images: torch.Tensor, onehots: torch.Tensor, device: torch.device,
                       progress: Callable[[int, float], None] | None = None,
                       known: torch.Tensor | None = None) -> list[float]:
    """Train `reg` in place on ROI images (N, 1, z, y, x) in [0, 1] and foreground one-hot labels (N, L-1, ...).
    `known` (N, L-1) bool: which foreground labels each case contours; the Dice term of a pair counts only the
    labels both cases contour (None: all)."""
    cfg = reg.cfg
    if len(images) < 2:
        raise ValueError("registration training needs at least two labelled cases")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    losses_fn = Losses(cfg.ncc_window)
    opt = torch.optim.Adam(reg.net.parameters(), lr=cfg.lr)
    known = torch.ones(onehots.shape[:2], dtype=torch.bool) if known is None else known
    reg.to(device).train()
    history, t0 = [], time.perf_counter()
    for it in range(cfg.iterations):
        src, tgt, src_lab, tgt_lab, both = (t.to(device) for t in _pair_batch(images, onehots, known, rng,
                                                                             cfg.batch_size))
        v = reg.velocity(src, tgt)
        disp = reg.displacement(v, src.shape[2:])
        loss = (losses_fn.image(reg.warp(src, disp), tgt)
                + cfg.w_dice * losses_fn.overlap(reg.warp(src_lab, disp), tgt_lab, both)).mean() \
            + cfg.w_smooth * losses_fn.smooth(v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if progress and (it + 1) % 100 == 0:
            progress(it + 1, float(np.mean(history[-100:])))
    reg.eval()
    log.info("registration trained %d iterations in %.0f s", cfg.iterations, time.perf_counter() - t0)
    return history
