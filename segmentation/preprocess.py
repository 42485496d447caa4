"""Preprocessing recorded in the model: orientation, target spacing, per-channel intensity scaling to
[0, 1], and the region of interest (ROI) cropping that registration and refinement work in.

The network sees images on a canonical grid (orientation `orientation`, spacing `spacing`); results go
back to the native grid by resampling in physical space, so any input orientation lands where it was.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from imaging.errors import InputError
from imaging.io import Geometry, Volume

MAX_CANONICAL_VOXELS = 512 * 512 * 1024  # as imaging.io.ReadLimits.max_voxels


class ChannelNorm(BaseModel):
    """Intensity scaling of one input channel to [0, 1].

    percentile: per image, clip to its own [low, high] percentiles (MR: arbitrary units).
    window: clip to fixed [low, high] values (CT: Hounsfield units), learnt from the training set.
    """

    scheme: Literal["percentile", "window"] = "percentile"
    low: float = 0.5
    high: float = 99.5

    def apply(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        if self.scheme == "percentile":
            lo, hi = np.percentile(array, [self.low, self.high])
        else:
            lo, hi = self.low, self.high
        if hi <= lo:
            return np.zeros_like(array)
        return ((np.clip(array, lo, hi) - lo) / (hi - lo)).astype(np.float32)


class Preprocessing(BaseModel):
    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # x, y, z in mm
    channels: list[ChannelNorm] = Field(default_factory=lambda: [ChannelNorm()])
    patch_size: tuple[int, int, int] = (64, 64, 64)  # z, y, x voxels: training crops, sliding window
    roi_size: tuple[int, int, int] = (64, 64, 64)  # z, y, x voxels: registration and refinement box
    # spatial axes (z, y, x) along which a mirrored image with mirrored labels is still a valid case: not an axis
    # along which labels are lateralised (left/right parotid), in augmentation and in mirror averaging
    mirror_axes: tuple[int, ...] = (0, 1, 2)

    def canonical(self, image: sitk.Image, interpolator=sitk.sitkLinear) -> sitk.Image:
        """Reorient and resample one image onto this model's canonical grid."""
        image = sitk.DICOMOrient(image, self.orientation)
        spacing = np.asarray(image.GetSpacing())
        target = np.asarray(self.spacing)
        if not np.all((spacing >= 1e-3) & (spacing <= 1e3)):
            raise InputError(f"voxel spacing {tuple(float(s) for s in spacing)} mm is outside 0.001..1000 mm; "
                             "the header's spacing is wrong")
        if np.allclose(spacing, target, rtol=1e-3):
            return image
        size = np.maximum(1, np.round(np.asarray(image.GetSize()) * spacing / target)).astype(int)
        if np.prod(size, dtype=np.int64) > MAX_CANONICAL_VOXELS:
            raise InputError(f"the scan covers {tuple(float(e) for e in np.asarray(image.GetSize()) * spacing)} mm; "
                             "on this "
                             f"model's {tuple(self.spacing)} mm grid that is {tuple(int(v) for v in size)} voxels, "
                             "over the "
                             f"limit of {MAX_CANONICAL_VOXELS:,}")
        return sitk.Resample(image, [int(s) for s in size], sitk.Transform(), interpolator, image.GetOrigin(),
                             tuple(float(t) for t in target), image.GetDirection(), 0.0, image.GetPixelID())

    def images(self, volumes: list[Volume]) -> tuple[np.ndarray, Geometry]:
        """Channels (C, z, y, x) in [0, 1] on the canonical grid, and that grid."""
        if len(volumes) != len(self.channels):
            raise InputError(f"the model takes {len(self.channels)} channel(s); {len(volumes)} given")
        out, geometry = [], None
        for volume, norm in zip(volumes, self.channels):
            image = self.canonical(sitk.Cast(volume.to_sitk(), sitk.sitkFloat32))
            geometry = Geometry.of(image)
            out.append(norm.apply(sitk.GetArrayViewFromImage(image)))
        return np.stack(out), geometry

    def label(self, volume: Volume) -> np.ndarray:
        """A label map on the canonical grid (nearest neighbour)."""
        return sitk.GetArrayFromImage(self.canonical(volume.to_sitk(), sitk.sitkNearestNeighbor))


def to_native(probs: np.ndarray, canonical: Geometry, native: Geometry) -> np.ndarray:
    """Class probabilities (L, z, y, x) on the canonical grid -> label map on the native grid."""
    same = canonical.size == native.size and np.allclose(canonical.spacing, native.spacing) \
        and np.allclose(canonical.origin, native.origin) and np.allclose(canonical.direction, native.direction)
    if same:
        return probs.argmax(0).astype(np.uint16)
    reference = native.image_from_array(np.zeros(native.size[::-1], dtype=np.float32))
    resampled = [sitk.GetArrayFromImage(sitk.Resample(canonical.image_from_array(p.astype(np.float32)), reference,
                                                      sitk.Transform(), sitk.sitkLinear, 0.0 if i else 1.0))
                 for i, p in enumerate(probs)]
    return np.stack(resampled).argmax(0).astype(np.uint16)


# ---------------------------------------------------------------------------------------------- ROI

def centroid(mask: np.ndarray) -> tuple[int, ...]:
    """Centre of mass of a mask in voxels; the grid centre when the mask is empty."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return tuple(s // 2 for s in mask.shape)
    return tuple(int(round(c)) for c in idx.mean(0))


def _box(center, size, shape):
    starts = [c - s // 2 for c, s in zip(center, size)]
    src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(starts, size, shape))
    dst = tuple(slice(max(0, -a), max(0, -a) + (sl.stop - sl.start)) for a, sl in zip(starts, src))
    return src, dst


def crop(array: np.ndarray, center, size) -> np.ndarray:
    """A box of `size` around `center` in the last 3 axes, zero-padded where it leaves the array."""
    src, dst = _box(center, size, array.shape[-3:])
    out = np.zeros(array.shape[:-3] + tuple(size), dtype=array.dtype)
    out[(...,) + dst] = array[(...,) + src]
    return out


def paste(target: np.ndarray, box: np.ndarray, center) -> np.ndarray:
    """Write `box` (cropped around `center`) back into `target` in place; returns `target`."""
    src, dst = _box(center, box.shape[-3:], target.shape[-3:])
    target[(...,) + src] = box[(...,) + dst]
    return target
