"""The initial segmentation network: a MONAI residual 3D U-Net, described by a small typed config; or an ensemble of
such networks (per-fold members, or one member per sequence) that is one network to everything downstream."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class NetworkConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.0
    members: int = Field(1, ge=1, description="U-Nets in the ensemble (1: a single network)")
    combine: Literal["mean", "vote"] = Field("mean", description="how the members' masks are combined: probability "
                                                                 "averaging or majority vote")
    member_inputs: Literal["all", "one_each"] = Field("all", description="each member sees every sequence, or member "
                                                                         "k sequence k only (a per-sequence vote)")

    @model_validator(mode="after")
    def _ensemble_only(self):
        if self.members == 1 and (self.combine != "mean" or self.member_inputs != "all"):
            raise ValueError("combine and member_inputs describe an ensemble (members > 1)")
        return self

    def member(self) -> NetworkConfig:
        """The config of one member."""
        return self.model_copy(update={"members": 1, "combine": "mean", "member_inputs": "all"})


class Ensemble(torch.nn.Module):
    """Members whose softmax outputs are combined; returns log-probabilities, so that a softmax downstream (inference,
    TENT, the losses of fine-tuning) reads the combined probabilities. `vote`: the members' majority, ties broken by
    the mean probability; in training mode (fine-tuning) the mean, which has a gradient."""

    def __init__(self, members: list[torch.nn.Module], combine: str, member_inputs: str):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.combine, self.member_inputs = combine, member_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x if self.member_inputs == "all" else x[:, k: k + 1]) for k, m in enumerate(self.members)]
        probs = torch.stack([o.softmax(1) for o in outs]).mean(0)
        if self.combine == "vote" and not self.training:
            n_labels = probs.shape[1]
            votes = torch.stack([o.argmax(1) for o in outs])  # (K, B, ...)
            counts = F.one_hot(votes, n_labels).sum(0).movedim(-1, 1).to(probs.dtype)  # (B, L, ...)
            probs = counts + 1e-3 * probs
            probs = probs / probs.sum(1, keepdim=True)
        return probs.clamp_min(1e-7).log()


def build_network(cfg: NetworkConfig, in_channels: int, out_channels: int):
    """A MONAI UNet with affine instance normalisation (whose parameters TENT adapts), or an Ensemble of them."""
    from monai.networks.nets import UNet

    if cfg.members > 1:
        if cfg.member_inputs == "one_each" and cfg.members != in_channels:
            raise ValueError(f"a per-sequence ensemble has one member per sequence: {cfg.members} members, "
                             f"{in_channels} sequences")
        member_in = 1 if cfg.member_inputs == "one_each" else in_channels
        return Ensemble([build_network(cfg.member(), member_in, out_channels) for _ in range(cfg.members)],
                        cfg.combine, cfg.member_inputs)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=cfg.channels,
                strides=cfg.strides, num_res_units=cfg.num_res_units, dropout=cfg.dropout,
                norm=("instance", {"affine": True}))
