"""The initial segmentation network: a MONAI residual 3D U-Net, described by a small typed config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class NetworkConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.0


def build_network(cfg: NetworkConfig, in_channels: int, out_channels: int):
    """A MONAI UNet with affine instance normalisation (whose parameters TENT adapts)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=cfg.channels,
                strides=cfg.strides, num_res_units=cfg.num_res_units, dropout=cfg.dropout,
                norm=("instance", {"affine": True}))
