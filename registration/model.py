"""The learned registration network (voxelmorph `VxmPairwise`), its losses (neurite) and the field
operations (voxelmorph integration, resizing and spatial transformer) that everything else warps with.

The network runs on a grid `downsample` times coarser than the region of interest and predicts a
stationary velocity field; scaling and squaring turns it into a diffeomorphic displacement, which is
resized to the full-resolution grid to warp images and one-hot labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from imaging.checkpoint import describing, load_checkpoint, load_weights, save_checkpoint

FORMAT, KIND = 1, "isl-registration"


class RegistrationConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    nb_features: tuple[int, ...] = (16, 32, 32)
    integration_steps: int = 7
    downsample: int = 2
    ncc_window: int = 5
    # training loss: (1 - NCC) + w_dice * (1 - Dice(warped label, fixed label)) + w_smooth * |grad v|^2
    w_dice: float = 1.0
    w_smooth: float = 0.5
    iterations: int = Field(1000, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class Registrar(torch.nn.Module):
    """VxmPairwise on a coarse grid plus the full-resolution integration and warping around it."""

    def __init__(self, cfg: RegistrationConfig):
        import voxelmorph as vxm

        super().__init__()
        self.cfg = cfg
        self.net = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                             nb_features=cfg.nb_features, integration_steps=0)
        self.integrate = vxm.nn.modules.IntegrateVelocityField(steps=cfg.integration_steps)
        self.resize = vxm.nn.modules.ResizeDisplacementField(scale_factor=cfg.downsample)
        self.warp_linear = vxm.nn.modules.SpatialTransformer(interpolation_mode="linear")
        self.multiple = 2 ** len(cfg.nb_features)

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, self.cfg.downsample) if self.cfg.downsample > 1 else x

    def velocity(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Coarse stationary velocity (B, 3, ...) taking full-resolution `source` toward `target`."""
        src, tgt = self.coarse(source), self.coarse(target)
        shape = src.shape[2:]
        pad = []
        for n in reversed(shape):
            extra = math.ceil(n / self.multiple) * self.multiple - n
            pad += [0, extra]
        v = self.net(F.pad(src, pad), F.pad(tgt, pad), return_field_type="velocity")
        return v[(..., *[slice(0, n) for n in shape])]

    def displacement(self, velocity: torch.Tensor, shape) -> torch.Tensor:
        """Full-resolution displacement (B, 3, *shape) in voxels from a coarse velocity."""
        return self.upsample(self.integrate(velocity), shape)

    def upsample(self, disp: torch.Tensor, shape) -> torch.Tensor:
        """A coarse displacement (B, 3, ...) resized and rescaled to the full-resolution grid `shape`."""
        if self.cfg.downsample > 1:
            disp = self.resize(disp)
        if tuple(disp.shape[2:]) != tuple(shape):
            disp = F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)
        return disp

    def warp(self, moving: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return self.warp_linear(moving, disp)

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, KIND, FORMAT, self.net, config=self.cfg.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> Registrar:
        ckpt = load_checkpoint(path, KIND, FORMAT)
        with describing(path):
            reg = cls(RegistrationConfig(**ckpt["config"]))
        load_weights(reg.net, ckpt, path)
        return reg.to(device).eval()


class Losses:
    """neurite's NCC, Dice and spatial-gradient terms, with NCC and Dice turned into losses."""

    def __init__(self, ncc_window: int):
        import neurite as ne

        self.ncc = ne.nn.modules.NCC(window_size=ncc_window, reduction=None)
        self.dice = ne.nn.modules.Dice(reduction=None)
        self.grad = ne.nn.modules.SpatialGradient(penalty="l2")

    def image(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """1 - NCC per batch item. In float64: neurite's one-pass local variances can go slightly negative
        in float32 on flat regions (zero padding), which its range check rejects."""
        ncc = self.ncc(warped.clamp(0, 1).double(), fixed.clamp(0, 1).double())
        return 1.0 - ncc.flatten(1).mean(1).to(warped.dtype)

    def overlap(self, warped: torch.Tensor, fixed: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """1 - mean foreground Dice per batch item (inputs are one-hot or probabilities, foreground channels);
        with `known` (B, L-1) bool, the mean runs over the labels known on both sides only (partial labels)."""
        dice = self.dice(warped.clamp(0, 1), fixed.clamp(0, 1)).flatten(1)
        if known is None:
            return 1.0 - dice.mean(1)
        w = known.to(dice.dtype)
        return 1.0 - (dice * w).sum(1) / w.sum(1).clamp_min(1.0)

    def smooth(self, field: torch.Tensor) -> torch.Tensor:
        return self.grad(field)
