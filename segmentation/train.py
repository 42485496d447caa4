"""Supervised training of the initial segmentation network (DiceCE, marginal on partially labelled cases; AdamW,
one-cycle schedule)."""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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


class _Batches:
    """Augmented training batches in iteration order. The cases are drawn in order from `rng`; each sample's
    augmentation is seeded from (seed, iteration, slot), so the batches are the same whatever the number of
    `threads` that prepare them (0: in the training loop; more: that many threads keep 2 batches per thread ready
    while the network trains, which keeps a GPU busy: augmentation on the CPU is the slow part there)."""

    def __init__(self, images, labels, transform, rng: np.random.Generator, batch_size: int, seed: int,
                 threads: int = 0):
        self.images, self.labels, self.transform, self.rng = images, labels, transform, rng
        self.batch_size, self.seed, self.threads = batch_size, seed, threads
        self.local = threading.local()
        # one torch thread each (the setting is per thread): many threads, each with a team of all cores, would
        # oversubscribe the CPU
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="augment",
                                       initializer=torch.set_num_threads, initargs=(1,)) if threads else None
        self.ahead: deque = deque()
        self.next_it = 0

    def _sample(self, case: int, iteration: int, slot: int):
        transform = getattr(self.local, "transform", None)
        if transform is None:  # MONAI's random transforms keep state: one copy per thread
            transform = self.local.transform = copy.deepcopy(self.transform)
        transform.set_random_state(seed=_sample_seed(self.seed, iteration, slot))
        sample = transform({"image": self.images[case], "label": self.labels[case][None]})
        sample = sample[0] if isinstance(sample, list) else sample
        return torch.as_tensor(sample["image"]), torch.as_tensor(sample["label"])

    def _make(self, iteration: int):
        picked = self.rng.integers(0, len(self.images), size=self.batch_size)
        return picked, [(int(c), iteration, j) for j, c in enumerate(picked)]

    def next(self):
        """(images, labels, picked case indices) of the next iteration."""
        if self.pool is None:
            picked, jobs = self._make(self.next_it)
            samples = [self._sample(*job) for job in jobs]
        else:
            while len(self.ahead) < 2 * self.threads:
                picked, jobs = self._make(self.next_it + len(self.ahead))
                self.ahead.append((picked, [self.pool.submit(self._sample, *job) for job in jobs]))
            picked, futures = self.ahead.popleft()
            samples = [f.result() for f in futures]
        self.next_it += 1
        xs, ys = zip(*samples)
        return torch.stack(xs).float(), torch.stack(ys).long(), picked

    def close(self):
        if self.pool is not None:
            for _, futures in self.ahead:
                for f in futures:
                    f.cancel()
            self.pool.shutdown(wait=True)


def loader_threads(device: torch.device) -> int:
    """Threads that prepare batches: none on the CPU (the cores train the network), and on a GPU all cores but
    one (at most 8)."""
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if torch.device(device).type == "cuda" else 0


def train_network(net, images: list[np.ndarray], labels: list[np.ndarray], patch_size, cfg: TrainConfig,
                  device: torch.device, progress: Callable[[int, float], None] | None = None,
                  annotated: np.ndarray | None = None, mirror_axes=(0, 1, 2),
                  frozen: tuple[list[torch.nn.Parameter], int] = ([], 0), threads: int | None = None) -> list[float]:
    """Train `net` in place on images (C, z, y, x) in [0, 1] and label maps (z, y, x); returns the loss curve.
    `annotated` (N, L) bool says which labels each case contours (partial labels: see segmentation.losses);
    None: every case contours every label. `mirror_axes`: the spatial axes along which mirroring keeps labels
    valid (see worker.training.train.mirror_axes). `frozen` (parameters, steps): those parameters are held still
    for the first steps (a transferred encoder, while the new output layer settles). `threads`: that prepare
    batches (default: `loader_threads(device)`); the batches do not depend on it."""
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
    threads = loader_threads(device) if threads is None else threads
    batches = _Batches(images, labels, transform, rng, cfg.batch_size, cfg.seed, threads)
    losses, t0, waited = [], time.perf_counter(), 0.0
    try:
        for it in range(cfg.iterations):
            if it == held_steps:
                for p in held:
                    p.requires_grad_(True)
            t = time.perf_counter()
            x, y, picked = batches.next()
            waited += time.perf_counter() - t
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
    finally:
        batches.close()
    for p in held:
        p.requires_grad_(True)
    log.info("trained %d iterations in %.0f s, %.0f s of it waiting for batches (%d threads preparing them)",
             cfg.iterations, time.perf_counter() - t0, waited, threads)
    set_determinism(None)
    return losses
