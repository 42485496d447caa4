"""A self-describing segmentation checkpoint: network config, weights, labels and preprocessing in one
file, loaded with `weights_only=True` and strict state loading."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from imaging.checkpoint import describing, load_checkpoint, load_weights, save_checkpoint
from segmentation.network import NetworkConfig, build_network
from segmentation.preprocess import Preprocessing

FORMAT, KIND = 1, "isl-segmentation"


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
        save_checkpoint(path, KIND, FORMAT, self.network, network=self.config.model_dump(mode="json"),
                        preprocessing=self.preprocessing.model_dump(mode="json"),
                        labels={str(k): v for k, v in self.labels.items()})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> SegmentationModel:
        ckpt = load_checkpoint(path, KIND, FORMAT)
        with describing(path):
            model = cls.create(NetworkConfig(**ckpt["network"]), Preprocessing(**ckpt["preprocessing"]),
                               {int(k): v for k, v in ckpt["labels"].items()})
        load_weights(model.network, ckpt, path)
        model.network.to(device).eval()
        return model
