"""Preview images of a result: slices through the scan in the three orthogonal planes with the network's mask
(baseline) and the refined mask drawn as outlines, for a person to look at (the web console shows them with a
slider). Rendered once when a job ends, stored beside its result: PNG files and preview.json, which lists them.

Slices are shown as a radiologist reads them: the volume turned to LPS, axial seen from the feet (the patient's
right on the left of the image), coronal from the front, sagittal from the patient's right, superior up, each
pixel at its physical aspect. The slices of each plane are evenly spaced over the extent of both masks (with a
margin), or over the whole scan when both are empty."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from imaging.io import Geometry

BASELINE, REFINED = (255, 159, 28), (0, 229, 255)  # orange and cyan: told apart by most colour-blind readers too
PLANES = ("axial", "coronal", "sagittal")
TARGET_PX = 320  # the longer side of each image


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _lps(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The array turned to LPS (z, y, x: superior, posterior, left increasing) and its spacing (x, y, z)."""
    turned = sitk.DICOMOrient(geometry.image_from_array(array), "LPS")
    return sitk.GetArrayFromImage(turned), turned.GetSpacing()


def _window(image: np.ndarray) -> tuple[float, float]:
    """CT in Hounsfield units (air near -1000): a soft-tissue window (level 40, width 400); otherwise (MR) the
    1st to 99th percentile."""
    sample = image[::2, ::2, ::2] if image.size > 10**6 else image
    if sample.min() < -500 and np.percentile(sample, 50) < 400:
        return -160.0, 240.0
    lo, hi = np.percentile(sample, (1, 99))
    return float(lo), float(hi if hi > lo else lo + 1)


def _plane(volume: np.ndarray, plane: str, k: int) -> np.ndarray:
    """The 2D slice k of `volume` (z, y, x in LPS), oriented for display (rows top to bottom)."""
    if plane == "axial":
        return volume[k]  # rows: anterior to posterior; columns: patient's right to left
    if plane == "coronal":
        return volume[::-1, k, :]  # rows: superior to inferior
    return volume[::-1, :, k]  # sagittal; columns: anterior to posterior


def _size(plane: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[int, int]:
    """(width, height) in pixels at the physical aspect, the longer side TARGET_PX."""
    sx, sy, sz = spacing
    nz, ny, nx = shape
    w_mm, h_mm = {"axial": (nx * sx, ny * sy), "coronal": (nx * sx, nz * sz), "sagittal": (ny * sy, nz * sz)}[plane]
    scale = TARGET_PX / max(w_mm, h_mm)
    return max(1, round(w_mm * scale)), max(1, round(h_mm * scale))


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label on its border (a 4-neighbour differs)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def _extent(mask: np.ndarray, axis: int, n: int) -> tuple[int, int]:
    other = tuple(a for a in range(3) if a != axis)
    hit = np.flatnonzero(mask.any(axis=other))
    if hit.size == 0:
        return 0, n - 1
    margin = max(2, (hit[-1] - hit[0]) // 8)
    return max(0, hit[0] - margin), min(n - 1, hit[-1] + margin)


def render_previews(image: np.ndarray, baseline: np.ndarray, refined: np.ndarray, geometry: Geometry,
                    out: Path, per_plane: int = 24) -> dict:
    """PNG slices of `image` (z, y, x on `geometry`) with both label maps as outlines into `out`, and
    out/preview.json: {"planes": {plane: [{"file", "index", "of"}...]}, "colours": ...}. Returns that index."""
    out.mkdir(parents=True, exist_ok=True)
    img, spacing = _lps(image.astype(np.float32), geometry)
    base, _ = _lps(baseline.astype(np.uint8), geometry)
    ref, _ = _lps(refined.astype(np.uint8), geometry)
    lo, hi = _window(img)
    grey = (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    axis_of = {"axial": 0, "coronal": 1, "sagittal": 2}
    index = {"planes": {}, "colours": {"baseline": _hex(BASELINE), "refined": _hex(REFINED)},
             "orientation": "LPS: axial from the feet, coronal from the front, sagittal from the patient's right"}
    for plane in PLANES:
        axis = axis_of[plane]
        first, last = _extent((base > 0) | (ref > 0), axis, img.shape[axis])
        ks = sorted({int(round(k)) for k in np.linspace(first, last, min(per_plane, last - first + 1))})
        size = _size(plane, img.shape, spacing)
        entries = []
        for i, k in enumerate(ks):
            g = Image.fromarray(np.ascontiguousarray(_plane(grey, plane, k))).resize(size, Image.BILINEAR)
            rgb = np.stack([np.asarray(g)] * 3, -1)
            for labels, colour in ((base, BASELINE), (ref, REFINED)):
                lab = np.asarray(Image.fromarray(np.ascontiguousarray(_plane(labels, plane, k))).resize(
                    size, Image.NEAREST))
                rgb[_outline(lab)] = colour
            name = f"{plane}_{i:02d}.png"
            Image.fromarray(rgb).save(out / name)
            entries.append({"file": name, "index": k, "of": int(img.shape[axis])})
        index["planes"][plane] = entries
    (out / "preview.json").write_text(json.dumps(index, indent=1) + "\n")
    return index
