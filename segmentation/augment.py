"""Training-time augmentation (MONAI dictionary transforms), shared by initial training and the
per-scan fine-tuning of inference-specific learning."""
from __future__ import annotations


def augmentation(patch_size, *, crop: bool = True, strength: float = 1.0, mirror_axes=(0, 1, 2)):
    """Spatial (crop around foreground, affine, mirror along `mirror_axes` only) and intensity (noise, gamma,
    scale, blur) transforms over {"image": (C, z, y, x), "label": (1, z, y, x)}; `strength` scales their
    probabilities."""
    from monai import transforms as T

    s = strength
    steps = []
    if crop:
        steps += [
            T.SpatialPadd(["image", "label"], spatial_size=patch_size),
            T.RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=patch_size, pos=2, neg=1, num_samples=1),
        ]
    steps += [
        T.RandAffined(["image", "label"], prob=0.3 * s, rotate_range=(0.26,) * 3, scale_range=(0.12,) * 3,
                      mode=("bilinear", "nearest"), padding_mode="border"),
        *[T.RandFlipd(["image", "label"], prob=0.5 * s, spatial_axis=a) for a in mirror_axes],
        T.RandGaussianNoised("image", prob=0.15 * s, std=0.03),
        T.RandGaussianSmoothd("image", prob=0.1 * s, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        T.RandScaleIntensityd("image", prob=0.15 * s, factors=0.25),
        T.RandAdjustContrastd("image", prob=0.3 * s, gamma=(0.7, 1.5)),
    ]
    return T.Compose(steps)
