"""Inference: sliding-window class probabilities, optionally averaged over mirror flips."""
from __future__ import annotations

import itertools

import numpy as np
import torch

ALL_AXES = (0, 1, 2)  # spatial axes (z, y, x) of an image (C, z, y, x)


def flip_sets(axes) -> list[tuple[int, ...]]:
    """Every combination of mirrors over spatial `axes` (True: all three; False or (): none), as tensor dims of a
    batch (B, C, z, y, x): 8 for all three axes, 1 (the identity) for none."""
    axes = ALL_AXES if axes is True else (() if axes is False else tuple(axes))
    dims = tuple(a + 2 for a in axes)
    return [s for r in range(len(dims) + 1) for s in itertools.combinations(dims, r)]


def _forward(net, x: torch.Tensor, patch_size) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    if tuple(x.shape[2:]) == tuple(patch_size):
        return net(x)
    return sliding_window_inference(x, patch_size, sw_batch_size=2, predictor=net, overlap=0.5, mode="gaussian",
                                    padding_mode="constant")


@torch.no_grad()
def predict_probs(net, x: torch.Tensor, patch_size, flips: bool | tuple = False) -> torch.Tensor:
    """Mean softmax (B, L, z, y, x) of `net` on `x` (B, C, z, y, x); with `flips`, the mean over the mirrors of the
    model's mirror axes (a tuple of spatial axes; True: all three, 8 mirrors)."""
    net.eval()
    sets = flip_sets(flips)
    total = None
    for axes in sets:
        xi = torch.flip(x, axes) if axes else x
        p = torch.softmax(_forward(net, xi, patch_size), 1)
        p = torch.flip(p, axes) if axes else p
        total = p if total is None else total + p
    return total / len(sets)


def predict(net, image: np.ndarray, patch_size, device: torch.device, flips: bool | tuple = False) -> np.ndarray:
    """Class probabilities (L, z, y, x) for one preprocessed image (C, z, y, x)."""
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    return predict_probs(net, x, patch_size, flips)[0].cpu().numpy()
