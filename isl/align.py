"""Step 2 of the method and its feedback: the labelled atlases deformed toward the scan by the learned
registration, the K most similar kept, and their displacements instance-optimised with the weak-supervision
Dice to the scan's current mask; plus what the warped atlases give: their majority vote and their non-local
label fusion. Experiments (ISLConfig.atlas_alignment, full_resolution_steps) change what the alignment hands on
(`Aligner.variant`); their defaults hand it on as it is."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from isl.bundle import Atlases
from isl.config import ISLConfig
from registration import affine
from registration.fusion import fuse_labels
from registration.instance import InstanceConfig, instance_optimise
from registration.model import Losses, Registrar


@dataclass
class Aligned:
    """The K selected atlases deformed toward the scan's ROI."""

    index: torch.Tensor  # (K,) which atlases of the bundle
    field: torch.Tensor  # (K, 3, *coarse) the optimised displacements on the registration's coarse grid
    images: torch.Tensor  # (K, C, *roi) warped atlas images
    labels: torch.Tensor  # (K, L, *roi) warped one-hot atlas labels
    displacement: torch.Tensor  # (K, 3, *roi) the displacements at full resolution (voxels)
    known: torch.Tensor  # (K, L) bool: the labels each atlas contours


class Aligner:
    """The registration network and a bundle's atlases, on one device."""

    def __init__(self, reg: Registrar, atlases: Atlases, device: torch.device, spacing=(1.0, 1.0, 1.0)):
        self.reg, self.atlases, self.device, self.spacing = reg, atlases, device, tuple(spacing)
        self.images, self.onehot, self.ids = atlases.images.to(device), atlases.onehot.to(device), atlases.case_ids
        self.known = atlases.known.to(device)
        self.losses = Losses(reg.cfg.ncc_window)

    def with_atlases(self, extra: Atlases | None) -> Aligner:
        """The same registration over this bank and `extra` atlases (e.g. radiologists' corrections)."""
        return self if extra is None or not extra.case_ids else Aligner(self.reg, self.atlases.plus(extra),
                                                                         self.device, self.spacing)

    @torch.no_grad()
    def global_stage(self, scan: torch.Tensor, probs: np.ndarray, cfg: affine.AffineConfig) -> tuple[Aligner, dict]:
        """Every atlas brought onto the scan's region by one global transform (`cfg.kind`), fitted to the scan's
        mask `probs` (L, *roi) and sampled from the atlas's context crop where it has one (so that what a turn or a
        zoom brings into the region is there): an Aligner over the transformed atlases, less those whose transform
        is implausible (left out, not fused; all kept as cropped when none is plausible), and per atlas id its
        transform's scale, rotation and translation."""
        if cfg.kind == "none":
            return self, {}
        mask, shape = _foreground(probs, scan.device), tuple(scan.shape[2:])
        context = self.atlases.context_images is not None
        source = tuple(self.atlases.context_images.shape[2:]) if context else shape
        images, onehots, described = [], [], []
        for i in range(0, len(self.images), 8):
            img, onehot = self._source(i, i + 8, context)
            with torch.enable_grad():
                th = affine.fit(img[:, :1], onehot[:, 1:], scan, mask, self.spacing, cfg, self.known[i:i + 8, 1:],
                                self.reg.cfg.ncc_window)
            described += affine.describe(th, shape, self.spacing, cfg, source)
            images.append(affine.warp(img, th, shape, padding="border"))
            onehots.append(affine.warp(onehot, th, shape))
        transforms = dict(zip(self.ids, described))
        keep = [i for i, d in enumerate(described) if d["plausible"]]
        if not keep:
            return self, transforms
        idx = torch.tensor(keep, device=self.images.device)
        moved = Atlases([self.ids[i] for i in keep], torch.cat(images)[idx], torch.cat(onehots)[idx], self.known[idx])
        return Aligner(self.reg, moved, self.device, self.spacing), transforms

    def _source(self, start: int, stop: int, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Atlases start:stop as a global transform samples them: images and one-hot labels, on their context crop
        when `context`, else on the region."""
        if not context:
            return self.images[start:stop], self.onehot[start:stop]
        labels = self.atlases.context_labels[start:stop].to(self.device).long()
        onehot = torch.nn.functional.one_hot(labels, self.onehot.shape[1]).permute(0, 4, 1, 2, 3).float()
        return self.atlases.context_images[start:stop].to(self.device), onehot

    @torch.no_grad()
    def select(self, scan: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Register every atlas with the network; keep the k with the best image + label agreement: their
        indices and their integrated (diffeomorphic) coarse displacements."""
        velocities, scores = [], []
        for i in range(0, len(self.images), 8):
            imgs, labs = self.images[i:i + 8], self.onehot[i:i + 8, 1:]
            target = scan.expand(len(imgs), -1, -1, -1, -1)
            v = self.reg.velocity(imgs[:, :1], target)
            disp = self.reg.displacement(v, scan.shape[2:])
            image_loss = self.losses.image(self.reg.warp(imgs[:, :1], disp), target)
            label_loss = self.losses.overlap(self.reg.warp(labs, disp), mask.expand(len(imgs), -1, -1, -1, -1),
                                             self.known[i:i + 8, 1:])
            velocities.append(v)
            scores.append(-(image_loss + label_loss))
        order = torch.argsort(torch.cat(scores), descending=True)[:k]
        return order, self.reg.integrate(torch.cat(velocities)[order])

    def optimise(self, index: torch.Tensor, field: torch.Tensor, scan: torch.Tensor, mask: torch.Tensor,
                 cfg: InstanceConfig) -> Aligned:
        """Instance-optimise the displacements of atlases `index` toward the scan and its current foreground
        probabilities `mask` (1, L-1, *roi), then warp them at full resolution."""
        known = self.known[index]
        field = instance_optimise(self.reg, self.images[index, :1], self.onehot[index, 1:], scan, mask, field, cfg,
                                  known[:, 1:])
        with torch.no_grad():
            disp = self.reg.upsample(field, scan.shape[2:])
            images, labels = self.reg.warp(self.images[index], disp), self.reg.warp(self.onehot[index], disp)
        return Aligned(index, field, images, labels, disp, known)

    def register(self, scan: torch.Tensor, probs: np.ndarray, k: int, cfg: InstanceConfig) -> Aligned:
        """Step 2: select k atlases and instance-optimise them toward the scan's mask `probs` (L, *roi)."""
        mask = _foreground(probs, scan.device)
        index, field = self.select(scan, mask, min(k, len(self.ids)))
        return self.optimise(index, field, scan, mask, cfg)

    def reregister(self, aligned: Aligned, scan: torch.Tensor, probs: np.ndarray, steps: int,
                   cfg: InstanceConfig) -> Aligned:
        """The feedback: `steps` more steps of the same optimisation toward the scan's current mask `probs`."""
        return self.optimise(aligned.index, aligned.field, scan, _foreground(probs, scan.device),
                             cfg.model_copy(update={"steps": steps}))

    def variant(self, aligned: Aligned, scan: torch.Tensor, probs: np.ndarray, cfg: ISLConfig) -> Aligned:
        """What an alignment hands on under the config's experiments: `aligned` itself with their defaults (the
        method); the same atlases undeformed (`atlas_alignment`); or `full_resolution_steps` more steps toward the
        scan's mask `probs` on the full-resolution grid."""
        if cfg.atlas_alignment == "undeformed":
            return self.undeformed(aligned)
        if cfg.full_resolution_steps:
            fine = cfg.registration.model_copy(update={"steps": cfg.full_resolution_steps,
                                                       "lr": cfg.full_resolution_lr})
            return self.full_resolution(aligned, scan, _foreground(probs, scan.device), fine)
        return aligned

    def undeformed(self, aligned: Aligned) -> Aligned:
        """The atlases of `aligned` as they are (zero displacement): the network's own training crops."""
        index = aligned.index
        return Aligned(index, torch.zeros_like(aligned.field), self.images[index].clone(), self.onehot[index].clone(),
                       torch.zeros_like(aligned.displacement), self.known[index])

    def full_resolution(self, aligned: Aligned, scan: torch.Tensor, mask: torch.Tensor,
                        cfg: InstanceConfig) -> Aligned:
        """`cfg.steps` instance-optimisation steps of `aligned`'s displacements on the full-resolution grid (the
        registration's `downsample` set to 1), toward the scan and its foreground probabilities `mask`
        (1, L-1, *roi). The coarse field stays as it was: a later re-registration starts from it."""
        full = full_grid(self.reg)
        index = aligned.index
        u = instance_optimise(full, self.images[index, :1], self.onehot[index, 1:], scan, mask, aligned.displacement,
                              cfg, aligned.known[:, 1:])
        with torch.no_grad():
            images, labels = full.warp(self.images[index], u), full.warp(self.onehot[index], u)
        return Aligned(index, aligned.field, images, labels, u, aligned.known)


def full_grid(reg: Registrar) -> Registrar:
    """The registration on the full-resolution grid (its `downsample` set to 1), sharing the network's weights."""
    full = copy.copy(reg)
    full.cfg = full.cfg.model_copy(update={"downsample": 1})
    return full


def _foreground(probs: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(probs[1:])[None].to(device)


def majority_vote(labels: torch.Tensor, known: torch.Tensor | None = None) -> np.ndarray:
    """One-hot (L, *roi) of the per-voxel majority of the warped atlas labels (K, L, *roi). With partial labels
    (`known` (K, L) bool, not all true) each label's vote is the share of the atlases contouring it that say it,
    and background's what those shares leave."""
    n_labels = labels.shape[1]
    votes = torch.nn.functional.one_hot(labels.argmax(1), n_labels)  # (K, z, y, x, L)
    if known is None or bool(known.all()):
        votes = votes.sum(0)
    else:  # as in fusion: background is what the labels' shares leave
        k = known.to(torch.float32)[:, None, None, None, :]
        votes = (votes * k).sum(0) / k.sum(0).clamp_min(1.0)
        votes[..., 0] = (1.0 - votes[..., 1:].sum(-1)).clamp_min(0)
    return torch.nn.functional.one_hot(votes.argmax(-1), n_labels).permute(3, 0, 1, 2).float().cpu().numpy()


def fuse(aligned: Aligned, scan: torch.Tensor, beta: float, window: int, search: int) -> np.ndarray:
    """Fused probabilities (L, *roi) of the warped atlas labels; see registration.fusion.fuse_labels."""
    labels = aligned.labels.clone()
    labels[:, 0] += 1.0 - labels.sum(1)  # warping pads with zeros: what left the atlas grid is background
    return fuse_labels(aligned.images, labels, scan, beta, window, search, aligned.known).cpu().numpy()
