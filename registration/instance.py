"""Per-scan instance optimisation of the atlas-to-scan displacement fields, batched over atlases, with the
weak-supervision term: Dice between each warped atlas label and the scan's current mask. The learned network
predicts a stationary velocity; its integrated displacement is the starting point, and the displacement
itself (not the velocity) is what is optimised here."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from pydantic import BaseModel, ConfigDict, Field

from registration.model import Losses, Registrar


class InstanceConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    steps: int = Field(30, ge=0, description="Adam steps on the coarse displacements")
    lr: float = Field(0.05, gt=0)
    w_dice: float = Field(0.3, ge=0, description="weight of 1 - Dice(warped atlas label, scan's current mask)")
    w_smooth: float = Field(2.0, ge=0, description="weight of |grad u|^2 of the displacement")


def instance_optimise(reg: Registrar, atlas_images: torch.Tensor, atlas_labels: torch.Tensor, scan: torch.Tensor,
                      scan_mask: torch.Tensor, displacement: torch.Tensor, cfg: InstanceConfig,
                      known: torch.Tensor | None = None) -> torch.Tensor:
    """Refine coarse displacements (K, 3, ...) so that atlases (K, 1, ...) with labels (K, L-1, ...) match the scan
    (1, 1, ...) and its current foreground probabilities (1, L-1, ...):
    loss = (1 - NCC) + w_dice * (1 - Dice(warped label, scan mask)) + w_smooth * |grad u|^2,
    the Dice over the labels each atlas contours (`known`, (K, L-1) bool; None: all).

    Starts from the network's diffeomorphic field (`reg.integrate(velocity)`) and optimises the displacement
    itself on the coarse grid the network predicts on: the same field at a fraction of the cost of
    integrating at every step; the smoothness term and the QA folding figure keep it honest."""
    losses = Losses(reg.cfg.ncc_window)
    k = len(atlas_images)
    moving, moving_labels = reg.coarse(atlas_images), reg.coarse(atlas_labels)
    fixed = reg.coarse(scan).expand(k, -1, -1, -1, -1)
    mask = reg.coarse(scan_mask).expand(k, -1, -1, -1, -1)
    u = displacement.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=cfg.lr)
    for _ in range(cfg.steps):
        loss = losses.image(reg.warp(moving, u), fixed).mean() + cfg.w_smooth * losses.smooth(u)
        if cfg.w_dice > 0:
            loss = loss + cfg.w_dice * losses.overlap(reg.warp(moving_labels, u), mask, known).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach()


def folding_fraction(disp: torch.Tensor) -> float:
    """Share of voxels where the Jacobian determinant of x + u(x) is not positive (folding), over displacements
    (K, 3, z, y, x) in voxels. SimpleITK's DisplacementFieldJacobianDeterminant (central differences) on each
    field padded by one voxel of linear extrapolation, so that the derivative on the border is the one-sided
    difference (as numpy.gradient's, which this figure was defined with)."""
    u = disp.detach().cpu().double().numpy()
    folded = 0
    for field in u:
        padded = np.pad(field, ((0, 0), (1, 1), (1, 1), (1, 1)), mode="reflect", reflect_type="odd")
        vectors = np.ascontiguousarray(np.moveaxis(padded[::-1], 0, -1))  # components in ITK's x, y, z order
        det = sitk.DisplacementFieldJacobianDeterminant(sitk.GetImageFromArray(vectors, isVector=True))
        folded += int(np.count_nonzero(sitk.GetArrayViewFromImage(det)[1:-1, 1:-1, 1:-1] <= 0))
    return folded / (u.shape[0] * np.prod(u.shape[2:]))
