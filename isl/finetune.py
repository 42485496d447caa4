"""Step 3 of the method: a per-case copy of the network fine-tuned on the deformed atlases, the scan's mask kept
as a moving average of its predictions, and that mask fed back into the alignment every few steps, until the
mask stops changing."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from isl.align import Aligned, Aligner, fuse
from isl.config import ISLConfig
from isl.mask import EMAMask, Start
from isl.timer import Timer
from segmentation.adapt import norm_parameters
from segmentation.augment import augmentation
from segmentation.infer import predict_probs
from segmentation.losses import marginal_dice_ce
from segmentation.transfer import encoder_parameters


@dataclass
class Tuned:
    network: torch.nn.Module  # the fine-tuned per-case copy
    ema: EMAMask  # the moving-average mask of the scan (ROI) and its history
    steps: int  # fine-tuning steps run (fewer than the bound when the stopping rule fired)
    aligned: Aligned  # the atlases after the last feedback re-registration
    fused: np.ndarray | None  # their fusion, when fine-tuning needed it (scan_weight > 0)


class FineTuning:
    """One case's fine-tuning: the optimiser, the augmentation and the batches of deformed atlases."""

    def __init__(self, net, start: Start, cfg: ISLConfig, rng: np.random.Generator, device: torch.device):
        self.cfg, self.start, self.rng, self.device = cfg, start, rng, device
        self.network = copy.deepcopy(net).to(device)
        params = tuned_parameters(self.network, cfg.finetune_params)
        for p in self.network.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.opt = (torch.optim.SGD(params, lr=cfg.finetune_lr, momentum=0.9) if cfg.finetune_optimizer == "sgd"
                    else torch.optim.Adam(params, lr=cfg.finetune_lr))
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(cfg.finetune_steps, 1))
                      if cfg.finetune_schedule == "cosine" else None)
        self.transform = augmentation(start.mask.shape[1:], crop=False, strength=cfg.augment_strength,
                                      mirror_axes=start.mirror_axes)
        self.transform.set_random_state(seed=cfg.seed)

    def _sample(self, image: torch.Tensor, label: torch.Tensor, xs: list, ys: list) -> None:
        sample = self.transform({"image": image.cpu(), "label": label})
        xs.append(torch.as_tensor(sample["image"]))
        ys.append(torch.as_tensor(sample["label"]))

    def batch(self, aligned: Aligned,
              target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of augmented deformed atlases and the labels each contours, plus the augmented scan with its
        confident pseudo-label (`target`: (1, *roi) class indices, L where not confident) when given."""
        xs, ys = [], []
        picked = self.rng.integers(0, len(aligned.images), size=self.cfg.finetune_batch)
        for i in picked:
            self._sample(aligned.images[i], aligned.labels[i].argmax(0, keepdim=True).cpu(), xs, ys)
        if target is not None:
            self._sample(self.start.image[0], target, xs, ys)
        known = aligned.known[torch.from_numpy(picked).to(aligned.known.device)]
        return torch.stack(xs).float().to(self.device), torch.stack(ys).long().to(self.device), known

    def pseudo_label(self, ema: np.ndarray, fused: np.ndarray) -> torch.Tensor:
        """The current estimate's class where it is confident, L (ignored) elsewhere."""
        w = self.cfg.fusion_weight
        estimate = (1 - w) * ema + w * fused
        target = estimate.argmax(0)
        target[estimate.max(0) < self.cfg.pseudo_confidence] = len(estimate)
        return torch.from_numpy(target[None].astype(np.float32))

    def step(self, aligned: Aligned, ema: EMAMask, fused: np.ndarray | None) -> None:
        """One optimiser step on the deformed atlases (and, with `scan_weight` > 0, on the scan's pseudo-label)."""
        self.network.train()
        if fused is None:
            xb, yb, known = self.batch(aligned)
            loss = marginal_dice_ce(self.network(xb), yb, known)
        else:
            xb, yb, known = self.batch(aligned, self.pseudo_label(ema.probs, fused))
            logits, n = self.network(xb), self.cfg.finetune_batch
            ignore = aligned.labels.shape[1]
            loss = marginal_dice_ce(logits[:n], yb[:n], known) + self.cfg.scan_weight * \
                torch.nn.functional.cross_entropy(logits[n:], yb[n:, 0], ignore_index=ignore)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def predict(self) -> np.ndarray:
        return predict_probs(self.network, self.start.image, self.start.mask.shape[1:])[0].cpu().numpy()


def blended(net: torch.nn.Module, tuned: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """`alpha` x the tuned copy's weights + (1 - alpha) x the network's, as a new copy (`tuned` itself at 1)."""
    if alpha >= 1.0:
        return tuned
    out, theirs = copy.deepcopy(tuned), dict(net.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.lerp_(theirs[name].to(p.device), 1.0 - alpha)
    return out


def tuned_parameters(net: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The parameters per-case fine-tuning moves (`ISLConfig.finetune_params`)."""
    if which == "all":
        return list(net.parameters())
    if which == "decoder":
        frozen = {id(p) for p in encoder_parameters(net)}
        return [p for p in net.parameters() if id(p) not in frozen]
    return norm_parameters(net)


def finetune(net, start: Start, aligned: Aligned, aligner: Aligner, cfg: ISLConfig, rng: np.random.Generator,
             timer: Timer, report: Callable[[str, float], None],
             snapshot: Callable[[int, torch.nn.Module, Aligned], None] | None = None) -> Tuned:
    """Fine-tune a copy of `net` for at most `finetune_steps`; every `predict_every` steps fold its prediction
    into the moving-average mask (stop once it is stable, after `min_steps`); every `reregister_every` steps
    re-register the atlases toward that mask. Fine-tuning and re-registration are timed as separate stages.
    `snapshot(steps, network, aligned)`, when given, sees the state after every step, before any
    re-registration: what a run with `finetune_steps = steps` (and no early stop) would end with. The config's
    alignment experiments (`Aligner.variant`) apply to `aligned` first and after every re-registration; with their
    defaults, `aligned` is what fine-tuning learns from."""
    with timer.stage("finetune"):
        aligned = aligner.variant(aligned, start.scan, start.mask, cfg)
        tuning = FineTuning(net, start, cfg, rng, aligner.images.device)
        ema = EMAMask(start.mask, cfg.ema_decay, cfg.stop_tolerance, cfg.stop_patience)
        fused = _fused(aligned, start, cfg)  # the scan's pseudo-label needs it (scan_weight > 0)
    timer.seconds.setdefault("reregistration", 0.0)
    steps = 0
    for steps in range(1, cfg.finetune_steps + 1):
        with timer.stage("finetune"):
            tuning.step(aligned, ema, fused)
            report("finetune", 0.3 + 0.55 * steps / max(cfg.finetune_steps, 1))
            stop = steps % cfg.predict_every == 0 and ema.update(tuning.predict()) and steps >= cfg.min_steps
        if snapshot is not None:
            snapshot(steps, blended(net, tuning.network, cfg.finetune_interpolation), aligned)
        if stop:
            break
        if cfg.reregister_steps and steps % cfg.reregister_every == 0 and steps < cfg.finetune_steps:
            with timer.stage("reregistration"):
                aligned = aligner.variant(aligner.reregister(aligned, start.scan, ema.probs, cfg.reregister_steps,
                                                             cfg.registration), start.scan, ema.probs, cfg)
                fused = _fused(aligned, start, cfg)
    return Tuned(blended(net, tuning.network, cfg.finetune_interpolation), ema, steps, aligned, fused)


def _fused(aligned: Aligned, start: Start, cfg: ISLConfig) -> np.ndarray | None:
    if cfg.scan_weight <= 0:
        return None
    return fuse(aligned, start.scan, cfg.fusion_beta, cfg.fusion_window, cfg.fusion_search)
