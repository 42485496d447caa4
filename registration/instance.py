"""Per-scan instance optimisation of the atlas-to-scan velocity fields, batched over atlases, with the
weak-supervision term: Dice between each warped atlas label and the scan's current mask."""
from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel

from registration.model import Losses, Registrar


class InstanceConfig(BaseModel):
    steps: int = 30
    lr: float = 0.05
    w_dice: float = 0.3
    w_smooth: float = 2.0


def instance_optimise(reg: Registrar, atlas_images: torch.Tensor, atlas_labels: torch.Tensor, scan: torch.Tensor,
                      scan_mask: torch.Tensor, displacement: torch.Tensor, cfg: InstanceConfig) -> torch.Tensor:
    """Refine coarse displacements (K, 3, ...) so that atlases (K, 1, ...) with labels (K, L-1, ...) match the scan
    (1, 1, ...) and its current foreground probabilities (1, L-1, ...):
    loss = (1 - NCC) + w_dice * (1 - Dice(warped label, scan mask)) + w_smooth * |grad u|^2.

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
            loss = loss + cfg.w_dice * losses.overlap(reg.warp(moving_labels, u), mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach()


def folding_fraction(disp: torch.Tensor) -> float:
    """Share of voxels where the Jacobian determinant of x + u(x) is not positive (folding)."""
    u = disp.detach().cpu().double().numpy()
    grads = [np.gradient(u[:, c], axis=(1, 2, 3)) for c in range(3)]  # grads[c][d] = d u_c / d x_d
    jac = np.empty(u.shape[:1] + u.shape[2:] + (3, 3))
    for c in range(3):
        for d in range(3):
            jac[..., c, d] = grads[c][d] + (1.0 if c == d else 0.0)
    return float((np.linalg.det(jac) <= 0).mean())
