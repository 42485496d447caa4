"""A radiologist's correction of a refined mask, read onto the grid of the scan it corrects: a NIfTI label map on
that grid, or a DICOM SEG that references that DICOM series. Refused, with the reason, when the grid, the labels
or the references do not match: a correction that lands on the wrong voxels would teach the wrong anatomy."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imaging.errors import InputError
from imaging.io import Geometry, Volume, read_label_map

SPACING_TOL_MM, ORIGIN_TOL_MM, DIRECTION_TOL = 1e-3, 1e-2, 1e-4


def is_dicom(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def read_correction(path: str | os.PathLike, scan: Volume, labels: dict[int, str]) -> np.ndarray:
    """The correction at `path` as a label map (z, y, x) on `scan`'s grid, with the values of `labels` (value ->
    name, background 0 included or not)."""
    path = Path(path)
    values = sorted(v for v in labels if v != 0)
    if is_dicom(path):
        return _read_seg(path, scan, labels)
    volume, _ = read_label_map(path, values, max_stray_voxels=0)
    problem = grid_mismatch(volume.geometry, scan.geometry)
    if problem:
        raise InputError(f"{path.name}: its grid is not the job's ({problem}); send the label map on the grid of the "
                         "scan, as the job's mask.nii.gz is")
    return volume.array.astype(np.uint8)


def grid_mismatch(a: Geometry, b: Geometry) -> str | None:
    """Why grid `a` is not grid `b` (size, spacing, origin, orientation), or None when they are the same."""
    if tuple(a.size) != tuple(b.size):
        return f"size {_xyz(a.size)} voxels, the job's {_xyz(b.size)}"
    if not np.allclose(a.spacing, b.spacing, atol=SPACING_TOL_MM):
        return f"spacing {_xyz(a.spacing)} mm, the job's {_xyz(b.spacing)}"
    if not np.allclose(a.direction, b.direction, atol=DIRECTION_TOL):
        return "another orientation"
    if not np.allclose(a.origin, b.origin, atol=ORIGIN_TOL_MM):
        return f"origin {_xyz(a.origin)} mm, the job's {_xyz(b.origin)}"
    return None


def _xyz(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _read_seg(path: Path, scan: Volume, labels: dict[int, str]) -> np.ndarray:
    import highdicom as hd

    if scan.kind != "dicom" or not scan.dicom_headers:
        raise InputError(f"{path.name}: a DICOM SEG corrects a job whose input was a DICOM series; this job's input "
                         "was NIfTI: send the correction as a NIfTI label map on its grid")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure: not a SEG we can use
        raise InputError(f"{path.name}: not a readable DICOM Segmentation ({type(exc).__name__}: {exc})") from None
    series = str(scan.dicom_headers[0].SeriesInstanceUID)
    referenced = sorted({str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])})
    if series not in referenced:
        raise InputError(f"{path.name}: it references series {', '.join(referenced) or '(none)'}, not the series this "
                         f"job refined ({series})")
    value_of = {name.lower(): v for v, name in labels.items() if v != 0}
    segments = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    unknown = sorted(name for name in segments.values() if name.lower() not in value_of)
    if unknown:
        raise InputError(f"{path.name}: segments {unknown} are not labels of the model "
                         f"({', '.join(n for v, n in sorted(labels.items()) if v != 0)})")
    uids = [str(h.SOPInstanceUID) for h in scan.dicom_headers]
    try:
        if len(uids) == 1 and int(scan.dicom_headers[0].get("NumberOfFrames", 1) or 1) > 1:  # enhanced: by frame
            numbers = seg.get_pixels_by_source_frame(uids[0], list(range(1, scan.array.shape[0] + 1)),
                                                     combine_segments=True, skip_overlap_checks=True,
                                                     assert_missing_frames_are_empty=True)
        else:
            numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True,
                                                        assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path.name}: its frames do not lie on the job's series: {exc}") from None
    if numbers.shape != scan.array.shape:
        raise InputError(f"{path.name}: its frames make {numbers.shape}, the job's series {scan.array.shape}")
    out = np.zeros(numbers.shape, np.uint8)
    for n, name in segments.items():
        out[numbers == n] = value_of[name.lower()]
    return out
