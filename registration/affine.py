"""A global transform per atlas before the deformable registration, as multi-atlas pipelines start (ANTs' joint
label fusion, elastix, NiftyReg: rigid or affine, then deformable). Batched over atlases and driven by what the
method has of the scan: 1 - Dice between each warped atlas label and the scan's current mask (robust where the
image contrast differs), plus local NCC where the config weights it.

Transforms are parameterised in millimetres about the region's centre (rotation as the exponential of a skew
matrix, scale as exp of a log-scale, translation in mm), so that the identity is zero, the rotation and scale
the report gives are the physical ones, and the grid's anisotropy does not bend a rotation into a shear."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from registration.model import Losses

Kind = Literal["none", "rigid", "similarity", "affine"]


class AffineConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    kind: Kind = Field("none", description="global transform per atlas before the deformable stage "
                                           "(none: atlases as cropped around their own label's centre)")
    steps: int = Field(40, ge=0, description="Adam steps")
    lr: float = Field(0.04, gt=0, description="step size (radians, log-scale, and tenths of the region in mm)")
    w_image: float = Field(0.5, ge=0, description="weight of local 1 - NCC beside the label overlap (0.5: the best "
                                                  "of 0, 0.5 and 1 on head-and-neck validation cases)")
    downsample: int = Field(4, ge=1, description="optimised on a grid this many times coarser than the region (a "
                                                 "global transform needs no fine detail: 4 costs an eighth of 2)")
    max_scale: float = Field(1.5, gt=1, description="an atlas scaled by more than this (or less than its "
                                                    "inverse) along any axis is implausible and left out")
    max_rotation: float = Field(45.0, gt=0, le=180, description="an atlas rotated by more degrees is "
                                                                "implausible and left out")


def _skew(w: torch.Tensor) -> torch.Tensor:
    """(K, 3) -> (K, 3, 3) skew-symmetric matrices."""
    z = torch.zeros_like(w[:, 0])
    return torch.stack([torch.stack([z, -w[:, 2], w[:, 1]], -1), torch.stack([w[:, 2], z, -w[:, 0]], -1),
                        torch.stack([-w[:, 1], w[:, 0], z], -1)], 1)


class Params(torch.nn.Module):
    """The K transforms' free parameters; `matrix()` gives each as (A (K, 3, 3), t (K, 3)) in mm, mapping a
    point of the scan's region to the atlas point it samples: p_atlas = A p_scan + t."""

    def __init__(self, k: int, kind: Kind, extent_mm: torch.Tensor):
        super().__init__()
        self.kind, self.extent = kind, extent_mm
        self.rotation = torch.nn.Parameter(torch.zeros(k, 3))
        self.log_scale = torch.nn.Parameter(torch.zeros(k, 3 if kind == "affine" else 1))
        self.shear = torch.nn.Parameter(torch.zeros(k, 3))
        self.shift = torch.nn.Parameter(torch.zeros(k, 3))  # in tenths of the region's extent

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        rot = torch.linalg.matrix_exp(_skew(self.rotation))
        if self.kind == "rigid":
            a = rot
        else:
            scale = torch.diag_embed(torch.exp(self.log_scale).expand(-1, 3))
            a = rot @ scale
            if self.kind == "affine":
                upper = torch.zeros_like(a)
                upper[:, 0, 1], upper[:, 0, 2], upper[:, 1, 2] = self.shear[:, 0], self.shear[:, 1], self.shear[:, 2]
                a = a @ (torch.eye(3, dtype=a.dtype, device=a.device) + upper)
        return a, self.shift * self.extent / 10


def _half(shape, spacing_xyz, like: torch.Tensor) -> torch.Tensor:
    """mm per normalised unit along x, y, z of a grid `shape` (z, y, x)."""
    return torch.tensor([(n - 1) / 2 * s for n, s in zip(reversed(shape), spacing_xyz)], dtype=like.dtype,
                        device=like.device).clamp_min(1e-6)


def theta(a: torch.Tensor, t: torch.Tensor, shape, spacing_xyz, source_shape=None) -> torch.Tensor:
    """(K, 3, 4) for `F.affine_grid` on a grid `shape` (z, y, x) of voxels `spacing_xyz` (x, y, z) mm, sampling a
    grid `source_shape` (default: `shape`) with the same centre and spacing, from mm transforms about that centre.
    Normalised coordinates run (x, y, z), -1..1 corner to corner of each grid."""
    out, src = _half(shape, spacing_xyz, a), _half(source_shape or shape, spacing_xyz, a)
    norm = a / src[None, :, None] * out[None, None, :]  # P_src^-1 A P_out with P = diag(half)
    return torch.cat([norm, (t / src)[..., None]], -1)


def warp(x: torch.Tensor, th: torch.Tensor, shape=None, padding: str = "zeros") -> torch.Tensor:
    """Sample `x` (K, C, z, y, x) through transforms `th` (K, 3, 4) onto a grid `shape` (default: x's)."""
    shape = tuple(shape or x.shape[2:])
    grid = F.affine_grid(th.to(x.dtype), (len(x), x.shape[1], *shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def fit(atlas_images: torch.Tensor, atlas_labels: torch.Tensor, scan: torch.Tensor, scan_mask: torch.Tensor,
        spacing_xyz, cfg: AffineConfig, known: torch.Tensor | None = None, ncc_window: int = 5) -> torch.Tensor:
    """One transform per atlas (K, 1, *src) with foreground labels (K, L-1, *src) toward the scan (1, 1, *roi)
    and its current foreground probabilities (1, L-1, *roi): (K, 3, 4) for `warp` from the atlases' grid (the
    region, or a larger crop about the same centre) onto the region's.
    loss = 1 - Dice(warped label, scan mask) [over the labels each atlas contours] + w_image * (1 - NCC)."""
    k = len(atlas_images)
    shape, source = tuple(scan.shape[2:]), tuple(atlas_images.shape[2:])
    if cfg.kind == "none" or cfg.steps == 0:
        return theta(torch.eye(3).expand(k, 3, 3), torch.zeros(k, 3), shape, spacing_xyz, source).to(scan.device)
    pool = (lambda v: F.avg_pool3d(v, cfg.downsample)) if cfg.downsample > 1 else (lambda v: v)
    moving, moving_labels = pool(atlas_images), pool(atlas_labels)
    fixed, mask = pool(scan).expand(k, -1, -1, -1, -1), pool(scan_mask).expand(k, -1, -1, -1, -1)
    extent = torch.tensor([n * s for n, s in zip(reversed(shape), spacing_xyz)], dtype=torch.float32,
                          device=scan.device)
    params = Params(k, cfg.kind, extent).to(scan.device)
    losses = Losses(ncc_window)
    opt = torch.optim.Adam(params.parameters(), lr=cfg.lr)
    coarse = tuple(fixed.shape[2:])
    for _ in range(cfg.steps):
        th = theta(*params.matrix(), shape, spacing_xyz, source)
        loss = losses.overlap(warp(moving_labels, th, coarse), mask, known).sum()
        if cfg.w_image > 0:
            loss = loss + cfg.w_image * losses.image(warp(moving, th, coarse, padding="border"), fixed).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return theta(*params.matrix(), shape, spacing_xyz, source)


def describe(th: torch.Tensor, shape, spacing_xyz, cfg: AffineConfig, source_shape=None) -> list[dict]:
    """Per transform (K, 3, 4) made by `theta` (same shapes): its scales along its principal axes, its rotation in
    degrees and its translation in mm (scan to atlas, physical), and whether it is plausible under `cfg`'s limits."""
    out_half = np.array([(n - 1) / 2 * s for n, s in zip(reversed(shape), spacing_xyz)])
    half = np.array([(n - 1) / 2 * s for n, s in zip(reversed(source_shape or shape), spacing_xyz)])
    out = []
    for m in th.detach().cpu().double().numpy():
        a = m[:, :3] * half[:, None] / out_half[None, :]  # back to mm: P_src A_norm P_out^-1
        u, s, vt = np.linalg.svd(a)
        rot = u @ vt
        if np.linalg.det(rot) < 0:  # a reflection: never plausible
            angle = 180.0
        else:
            angle = math.degrees(math.acos(float(np.clip((np.trace(rot) - 1) / 2, -1, 1))))
        plausible = bool(angle <= cfg.max_rotation and s.max() <= cfg.max_scale and s.min() >= 1 / cfg.max_scale)
        out.append({"scale": [round(float(v), 3) for v in s], "rotation_deg": round(angle, 1),
                    "translation_mm": [round(float(v), 1) for v in m[:, 3] * half], "plausible": plausible})
    return out
