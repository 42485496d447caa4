"""Image and label-map I/O with geometry travelling beside the array.

One reader (`read_image`) for NIfTI files, DICOM folders and .zip archives of a DICOM series (the DICOM half
in `imaging/dicom.py`); one writer per output format (`write_label_map` for NIfTI, `write_dicom_seg`
for DICOM SEG), each putting the result back on the input's own grid. Arrays are in SimpleITK's numpy order
(z, y, x); geometry is in ITK's physical convention (LPS, spacing and origin in x, y, z order).

Untrusted bytes are checked before they are decoded: the header's declared size against a budget, the
whole compressed stream against its CRC and length (SimpleITK would zero-fill a truncated file), and
every voxel for NaN or infinity.
"""
from __future__ import annotations

import errno
import gzip
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imaging.errors import (
    CorruptImageError,
    GeometryMismatchError,
    ImageTooLargeError,
    InputError,
    LabelValueError,
    UnsupportedImageError,
)
from imaging.files import atomic_write

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ReadLimits:
    """Budgets checked before any voxel is decoded."""

    max_voxels: int = 512 * 512 * 1024
    max_archive_bytes: int = 4 * 1024**3
    max_archive_members: int = 20_000
    max_compression_ratio: float = 200.0


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in the patient: size, spacing and origin in (x, y, z), direction row-major."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        """An ITK image holding `array` (z, y, x) on this grid."""
        if tuple(array.shape[::-1]) != tuple(self.size):
            raise GeometryMismatchError(f"array shape {array.shape} (z,y,x) does not match grid size {self.size} "
                                        "(x,y,z)")
        return self.apply_to(sitk.GetImageFromArray(array))

    def check_same(self, other: Geometry, what: str, tol: float = 1e-3) -> None:
        """Raise GeometryMismatchError naming the field and both values if the grids differ."""
        if self.size != other.size:
            raise GeometryMismatchError(f"{what}: size {other.size} differs from {self.size}")
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = 1.0 if name == "direction" else max(1.0, float(np.abs(a).max()))
            if not np.allclose(a, b, atol=tol * scale):
                raise GeometryMismatchError(f"{what}: {name} {tuple(np.round(b, 4))} differs from "
                                            f"{tuple(np.round(a, 4))}")

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


@dataclass
class Volume:
    """A 3D image: voxels (z, y, x), the grid they lie on, and where they came from."""

    array: np.ndarray
    geometry: Geometry
    source: str
    kind: str = "nifti"  # "nifti" or "dicom"
    dicom_headers: list = field(default_factory=list)  # pydicom datasets (no pixels), in slice order

    def to_sitk(self) -> sitk.Image:
        return self.geometry.image_from_array(self.array)


# ---------------------------------------------------------------------------------------------- NIfTI

def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti_header(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path)).header
    except Exception as exc:  # nibabel raises many types for bad headers
        raise CorruptImageError(f"{path.name}: not a readable NIfTI header ({type(exc).__name__}: {exc})") from exc


def _check_nifti_shape(path: Path, header, limits: ReadLimits) -> None:
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise UnsupportedImageError(f"{path.name}: a {len(shape)}D image of shape {shape}; a single 3D volume is "
                                    "needed")
    if min(shape) < 1:
        raise UnsupportedImageError(f"{path.name}: shape {shape} has a zero-sized axis")
    if min(shape) < 2:
        raise UnsupportedImageError(f"{path.name}: shape {shape} is a 2D slice, not a 3D volume")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(f"{path.name}: header declares {shape} = {voxels:,} voxels, over the limit of "
                                 f"{limits.max_voxels:,}")
    zooms = np.asarray(header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise CorruptImageError(f"{path.name}: voxel spacing {tuple(zooms)} is not positive and finite")


def _stream_length(path: Path) -> int:
    """Decompressed length of a gzip file, verifying every member's CRC and length trailer."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptImageError(f"{path.name}: compressed stream is truncated or corrupt ({exc})") from exc
    return total


def _check_nifti_bytes(path: Path, header) -> None:
    offset = max(int(header.get_data_offset()), int(header["vox_offset"]) if "vox_offset" in header else 0, 348)
    needed = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    with open(path, "rb") as fh:
        compressed = fh.read(2) == GZIP_MAGIC
    have = _stream_length(path) if compressed else path.stat().st_size
    if have < needed:
        raise CorruptImageError(f"{path.name}: truncated: {have:,} bytes of image data where the header needs "
                                f"{needed:,}")


def _check_nifti_finite(path: Path) -> None:
    """ITK's reader turns NaN into 0: look at float data as stored, through nibabel."""
    import nibabel as nib

    img = nib.load(str(path))
    if img.header.get_data_dtype().kind != "f":
        return
    bad = int(np.count_nonzero(~np.isfinite(np.asanyarray(img.dataobj))))
    if bad:
        raise CorruptImageError(f"{path.name}: {bad:,} voxels are NaN or infinite")


def _read_nifti(path: Path, limits: ReadLimits) -> Volume:
    header = _nifti_header(path)
    _check_nifti_shape(path, header, limits)
    _check_nifti_bytes(path, header)
    _check_nifti_finite(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CorruptImageError(f"{path.name}: ITK cannot read it: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedImageError(f"{path.name}: {image.GetNumberOfComponentsPerPixel()} components per voxel; a "
                                    "scalar image is needed")
    return Volume(sitk.GetArrayFromImage(image), Geometry.of(image), str(path), "nifti")


# ---------------------------------------------------------------------------------------------- DICOM

def read_image(path: str | os.PathLike, *, series_uid: str | None = None, limits: ReadLimits = ReadLimits()) -> Volume:
    """Read a NIfTI file, a DICOM series folder or a .zip of one into a checked `Volume`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix.lower() == ".zip":
        from imaging.dicom import read_dicom  # it builds on this module's Volume and Geometry

        volume = read_dicom(path, series_uid, limits)
    elif _is_nifti(path):
        volume = _read_nifti(path, limits)
    else:
        raise InputError(f"{path.name}: unknown input type; give a .nii/.nii.gz file, a DICOM folder or a .zip of a "
                         "DICOM series")
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        raise CorruptImageError(f"{path.name}: {bad:,} voxels are NaN or infinite")
    return volume


@dataclass
class LabelReport:
    """What was done to a label map on reading: stray values mapped to background, voxel counts."""

    source: str
    remapped: dict[int, int] = field(default_factory=dict)

    def message(self) -> str:
        parts = [f"value {v} ({n} voxel{'s' if n != 1 else ''})" for v, n in sorted(self.remapped.items())]
        return f"{Path(self.source).name}: mapped {', '.join(parts)} to background (not a label of the dataset)"


def read_label_map(path: str | os.PathLike, labels: set[int] | list[int], *, max_stray_voxels: int = 10,
                   limits: ReadLimits = ReadLimits()) -> tuple[Volume, LabelReport]:
    """Read a label map and check its values against the dataset's labels.

    A value that is not a label of the dataset is an annotation artefact when it covers at most
    `max_stray_voxels` voxels (one voxel of -2 in MSD hippocampus_003): it is mapped to background and
    reported. More than that means a wrong file or a wrong dataset, and is refused.
    """
    volume = read_image(path, limits=limits)
    array = volume.array
    if array.dtype.kind == "f":
        if not np.all(array == np.round(array)):
            raise LabelValueError(f"{Path(path).name}: label map holds non-integer values")
    values, counts = np.unique(array, return_counts=True)
    allowed = set(int(v) for v in labels) | {0}
    stray = {int(v): int(n) for v, n in zip(values, counts) if int(v) not in allowed}
    too_many = {v: n for v, n in stray.items() if n > max_stray_voxels}
    if too_many:
        raise LabelValueError(f"{Path(path).name}: values {sorted(too_many)} (voxels {list(too_many.values())}) are "
                              "not "
                              f"labels of the dataset {sorted(allowed)}")
    array = array.astype(np.int16 if array.min() < 0 else np.uint16, copy=True)
    for v in stray:
        array[array == v] = 0
    volume.array = array.astype(np.uint8 if max(allowed) < 256 else np.uint16)
    return volume, LabelReport(str(path), stray)


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write an array (z, y, x) on `geometry` as NIfTI, atomically, and read it back before it takes its
    name: ITK's NIfTI writer only prints a failed write (a full disk) to stderr and returns normally."""
    image = geometry.image_from_array(array)

    def write(tmp: str) -> None:
        sitk.WriteImage(image, tmp, True)
        try:
            intact = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(tmp)), array)
        except RuntimeError:
            intact = False
        if not intact:
            full = shutil.disk_usage(os.path.dirname(tmp)).free < (1 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "No space left on device" if full else "the written file does not read back", str(path))

    return atomic_write(path, write)


def write_label_map(labels: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write an integer label map on the input's own grid as NIfTI (uint8, or uint16 past 255 labels)."""
    dtype = np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16
    return write_image(labels.astype(dtype), geometry, path)
