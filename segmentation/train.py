"""Supervised training of the initial segmentation network (DiceCE, marginal on partially labelled cases; AdamW,
one-cycle schedule)."""
from __future__ import annotations

import logging
import multiprocessing
import os
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


def _sample_seed(seed: int, iteration: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, slot]).generate_state(1)[0])


class IterationBatches(torch.utils.data.Dataset):
    """Item `i`: the augmented batch of training iteration `i` (images, labels, case indices). The cases are drawn in
    order from `rng` up front; each sample's augmentation is seeded from (seed, iteration, slot), so a batch is the
    same whichever process makes it: data-loader workers change the speed, not the training."""

    def __init__(self, images, labels, transform, rng: np.random.Generator, batch_size: int, iterations: int,
                 seed: int):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.picks = [rng.integers(0, len(images), size=batch_size) for _ in range(iterations)]

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, iteration: int):
        # one torch thread, in the loop as in a worker: some CPU ops round differently with many threads (16 threads
        # change the last bit of most patches: measured), and the workers share the cores
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            xs, ys = [], []
            for slot, case in enumerate(self.picks[iteration]):
                self.transform.set_random_state(seed=_sample_seed(self.seed, iteration, slot))
                sample = self.transform({"image": self.images[case], "label": self.labels[case][None]})
                sample = sample[0] if isinstance(sample, list) else sample
                xs.append(torch.as_tensor(sample["image"]))
                ys.append(torch.as_tensor(sample["label"]))
        finally:
            torch.set_num_threads(threads)
        return torch.stack(xs).float(), torch.stack(ys).long(), torch.as_tensor(self.picks[iteration])


def batch_loader(batches: IterationBatches, workers: int) -> torch.utils.data.DataLoader:
    """The batches in iteration order; with `workers` processes preparing 2 batches each ahead of the training
    loop (0: made in the loop)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                                       prefetch_factor=2 if workers else None)


def loader_workers(device: torch.device) -> int:
    """Processes that prepare batches: on a GPU, where augmentation on the CPU is the slow part, all cores but one
    (at most 8); none on the CPU (the cores train the network), and none in a daemonic process, which may not start
    children (a Celery prefork worker's child, where retraining runs)."""
    if torch.device(device).type != "cuda" or multiprocessing.current_process().daemon:
        return 0
    return min(8, max(1, len(os.sched_getaffinity(0)) - 1))


def train_network(net, images: list[np.ndarray], labels: list[np.ndarray], patch_size, cfg: TrainConfig,
                  device: torch.device, progress: Callable[[int, float], None] | None = None,
                  annotated: np.ndarray | None = None, mirror_axes=(0, 1, 2),
                  frozen: tuple[list[torch.nn.Parameter], int] = ([], 0), workers: int | None = None) -> list[float]:
    """Train `net` in place on images (C, z, y, x) in [0, 1] and label maps (z, y, x); returns the loss curve.
    `annotated` (N, L) bool says which labels each case contours (partial labels: see segmentation.losses);
    None: every case contours every label. `mirror_axes`: the spatial axes along which mirroring keeps labels
    valid (see isl.training.plan.mirror_axes). `frozen` (parameters, steps): those parameters are held still
    for the first steps (a transferred encoder, while the new output layer settles). `workers`: processes
    that prepare batches (default: `loader_workers(device)`); the batches do not depend on it."""
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
    workers = loader_workers(device) if workers is None else workers
    loader = iter(batch_loader(IterationBatches(images, labels, transform, rng, cfg.batch_size, cfg.iterations,
                                                cfg.seed), workers))
    losses, t0, waited = [], time.perf_counter(), 0.0
    try:
        for it in range(cfg.iterations):
            if it == held_steps:
                for p in held:
                    p.requires_grad_(True)
            t = time.perf_counter()
            x, y, picked = next(loader)
            waited += time.perf_counter() - t
            logits = net(x.to(device))
            present = (known[picked] if known is not None
                       else torch.ones(len(picked), logits.shape[1], dtype=torch.bool))
            loss = marginal_dice_ce(logits, y.to(device), present.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress and (it + 1) % 100 == 0:
                progress(it + 1, float(np.mean(losses[-100:])))
    finally:
        del loader  # ends the workers, also when training stops on an error
        for p in held:
            p.requires_grad_(True)
        set_determinism(None)
    log.info("trained %d iterations in %.0f s, %.0f s of it waiting for batches (%d worker processes preparing "
             "them)", cfg.iterations, time.perf_counter() - t0, waited, workers)
    return losses
