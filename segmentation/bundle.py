"""A self-describing segmentation checkpoint: network config, weights, labels and preprocessing in one
file, loaded with `weights_only=True` and strict state loading."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from segmentation.errors import BundleError
from segmentation.network import NetworkConfig, build_network
from segmentation.preprocess import Preprocessing

FORMAT = 1


@dataclass
class SegmentationModel:
    network: torch.nn.Module
    config: NetworkConfig
    preprocessing: Preprocessing
    labels: dict[int, str]  # value -> name, background included

    @classmethod
    def create(cls, config: NetworkConfig, preprocessing: Preprocessing, labels: dict[int, str]):
        net = build_network(config, len(preprocessing.channels), len(labels))
        return cls(net, config, preprocessing, dict(labels))

    def save(self, path: str | Path) -> None:
        torch.save({
            "format": FORMAT,
            "kind": "isl-segmentation",
            "network": self.config.model_dump(mode="json"),
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "labels": {str(k): v for k, v in self.labels.items()},
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
        }, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> SegmentationModel:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: segmentation checkpoint not found")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BundleError(f"{path}: not a loadable checkpoint ({exc})") from exc
        if ckpt.get("kind") != "isl-segmentation" or ckpt.get("format") != FORMAT:
            raise BundleError(f"{path}: kind {ckpt.get('kind')!r} format {ckpt.get('format')!r}; expected isl-segmentation format {FORMAT}")
        model = cls.create(NetworkConfig(**ckpt["network"]), Preprocessing(**ckpt["preprocessing"]),
                           {int(k): v for k, v in ckpt["labels"].items()})
        model.network.load_state_dict(ckpt["state_dict"], strict=True)
        model.network.to(device).eval()
        return model
