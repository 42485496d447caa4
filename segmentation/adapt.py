"""Test-time adaptation peer: TENT-style entropy minimisation of the normalisation layers' affine
parameters on the single scan (Wang et al., ICLR 2021)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from segmentation.infer import predict


def norm_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The affine parameters of `net`'s normalisation layers (what TENT, and per-case fine-tuning with
    `finetune_params="norm"`, may move); a clear error when it has none."""
    norms = (torch.nn.InstanceNorm3d, torch.nn.BatchNorm3d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    params = [p for m in net.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)]
    if not params:
        raise ValueError("the network has no normalisation layers with affine parameters to adapt")
    return params


def tent(net, image: np.ndarray, patch_size, device: torch.device, steps: int = 10, lr: float = 1e-3) -> np.ndarray:
    """Class probabilities after adapting a copy of `net`'s norm affine parameters to `image` (C, z, y, x)."""
    from monai.inferers import sliding_window_inference

    model = copy.deepcopy(net).to(device)
    model.eval()  # instance norm uses per-image statistics either way; eval keeps dropout off
    params = norm_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    for _ in range(steps):
        logits = model(x) if tuple(x.shape[2:]) == tuple(patch_size) else \
            sliding_window_inference(x, patch_size, 2, model, overlap=0.25)
        p = torch.softmax(logits, 1)
        entropy = -(p * torch.log(p.clamp_min(1e-8))).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        entropy.backward()
        opt.step()
    return predict(model, image, patch_size, device)
