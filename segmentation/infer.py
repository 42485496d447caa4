"""Inference: sliding-window class probabilities, optionally averaged over mirror flips."""
from __future__ import annotations

import itertools

import numpy as np
import torch

FLIP_SETS = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]  # 8 mirror combinations


def _forward(net, x: torch.Tensor, patch_size) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    if tuple(x.shape[2:]) == tuple(patch_size):
        return net(x)
    return sliding_window_inference(x, patch_size, sw_batch_size=2, predictor=net, overlap=0.5, mode="gaussian",
                                    padding_mode="constant")


@torch.no_grad()
def predict_probs(net, x: torch.Tensor, patch_size, flips: bool = False) -> torch.Tensor:
    """Mean softmax (B, L, z, y, x) of `net` on `x` (B, C, z, y, x); the mean over 8 mirror flips if `flips`."""
    net.eval()
    sets = FLIP_SETS if flips else [()]
    total = None
    for axes in sets:
        xi = torch.flip(x, axes) if axes else x
        p = torch.softmax(_forward(net, xi, patch_size), 1)
        p = torch.flip(p, axes) if axes else p
        total = p if total is None else total + p
    return total / len(sets)


def predict(net, image: np.ndarray, patch_size, device: torch.device, flips: bool = False) -> np.ndarray:
    """Class probabilities (L, z, y, x) for one preprocessed image (C, z, y, x)."""
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    return predict_probs(net, x, patch_size, flips)[0].cpu().numpy()
