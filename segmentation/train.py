"""Supervised training of the initial segmentation network (DiceCE, marginal on partially labelled cases; AdamW,
one-cycle schedule)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from segmentation.augment import augmentation
from segmentation.losses import marginal_dice_ce

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    iterations: int = Field(2500, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    seed: int = 0


def _batch(images, labels, transform, rng: np.random.Generator, batch_size: int):
    xs, ys = [], []
    picked = rng.integers(0, len(images), size=batch_size)
    for i in picked:
        sample = transform({"image": images[i], "label": labels[i][None]})
        sample = sample[0] if isinstance(sample, list) else sample
        xs.append(torch.as_tensor(sample["image"]))
        ys.append(torch.as_tensor(sample["label"]))
    return torch.stack(xs).float(), torch.stack(ys).long(), picked


def train_network(net, images: list[np.ndarray], labels: list[np.ndarray], patch_size, cfg: TrainConfig,
                  device: torch.device, progress: Callable[[int, float], None] | None = None,
                  annotated: np.ndarray | None = None, mirror_axes=(0, 1, 2),
                  frozen: tuple[list[torch.nn.Parameter], int] = ([], 0)) -> list[float]:
    """Train `net` in place on images (C, z, y, x) in [0, 1] and label maps (z, y, x); returns the loss curve.
    `annotated` (N, L) bool says which labels each case contours (partial labels: see segmentation.losses);
    None: every case contours every label. `mirror_axes`: the spatial axes along which mirroring keeps labels
    valid (see worker.training.train.mirror_axes). `frozen` (parameters, steps): those parameters are held still
    for the first steps (a transferred encoder, while the new output layer settles)."""
    from monai.utils import set_determinism

    set_determinism(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    transform = augmentation(patch_size, mirror_axes=mirror_axes)
    known = torch.from_numpy(np.asarray(annotated, bool)) if annotated is not None else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # warm-up over 5% of the steps, at least 1.5 (torch's one-cycle divides by zero on a shorter phase)
    warmup = min(0.9, max(0.05, 1.5 / cfg.iterations))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations, pct_start=warmup)
    net.to(device).train()
    held, held_steps = frozen
    for p in held:
        p.requires_grad_(held_steps <= 0)
    losses, t0 = [], time.perf_counter()
    for it in range(cfg.iterations):
        if it == held_steps:
            for p in held:
                p.requires_grad_(True)
        x, y, picked = _batch(images, labels, transform, rng, cfg.batch_size)
        logits = net(x.to(device))
        present = known[picked] if known is not None else torch.ones(len(picked), logits.shape[1], dtype=torch.bool)
        loss = marginal_dice_ce(logits, y.to(device), present.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (it + 1) % 100 == 0:
            progress(it + 1, float(np.mean(losses[-100:])))
    for p in held:
        p.requires_grad_(True)
    log.info("trained %d iterations in %.0f s", cfg.iterations, time.perf_counter() - t0)
    set_determinism(None)
    return losses
