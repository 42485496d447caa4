"""DICOM input: a series from a folder or a .zip archive (members checked before anything is extracted),
its slices' headers and pixel data checked before ITK decodes them (a missing slice, short pixel data,
several series without a choice are refused with the reason)."""
from __future__ import annotations

import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segmentation.errors import (
    AmbiguousSeriesError,
    CorruptImageError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
)
from segmentation.io import Geometry, ReadLimits, Volume


def safe_extract_zip(archive: Path, dest: Path, limits: ReadLimits = ReadLimits()) -> list[Path]:
    """Extract a zip archive refusing links, absolute or `..` member names and zip bombs."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptImageError(f"{archive.name}: not a readable zip archive ({exc})") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        _check_zip_members(archive, members, limits)
        out = []
        for member in members:
            target = dest / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(member) as src, open(target, "wb") as dst:
                    dst.write(src.read(member.file_size + 1))
            except (zipfile.BadZipFile, zlib.error, OSError) as exc:
                raise CorruptImageError(f"{archive.name}: member {member.filename!r} is corrupt ({exc})") from exc
            out.append(target)
    return out


def _check_zip_members(archive: Path, members: list[zipfile.ZipInfo], limits: ReadLimits) -> None:
    if len(members) > limits.max_archive_members:
        raise InputError(f"{archive.name}: {len(members)} members, over the limit of {limits.max_archive_members}")
    total = sum(m.file_size for m in members)
    packed = max(1, sum(m.compress_size for m in members))
    if total > limits.max_archive_bytes or total / packed > limits.max_compression_ratio:
        raise InputError(f"{archive.name}: expands to {total:,} bytes from {packed:,} (ratio {total / packed:.0f}); "
                         "refused as a possible zip bomb")
    for m in members:
        name = m.filename.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
            raise InputError(f"{archive.name}: member name {m.filename!r} points outside the archive")
        if stat.S_ISLNK(m.external_attr >> 16):
            raise InputError(f"{archive.name}: member {m.filename!r} is a symbolic link")


def list_dicom_series(folder: Path) -> dict[str, list[str]]:
    """Series instance UID -> file names sorted by slice position, for every series under `folder`.

    A file that claims one of these series but that GDCM cannot take as a slice (no pixel data, broken
    header) is an error, not something to drop silently."""
    import pydicom

    reader = sitk.ImageSeriesReader
    series: dict[str, list[str]] = {}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for directory in sorted({str(p.parent) for p in files}):
        for uid in reader.GetGDCMSeriesIDs(directory) or ():
            series.setdefault(uid, []).extend(reader.GetGDCMSeriesFileNames(directory, uid))
    listed = {os.path.abspath(f) for names in series.values() for f in names}
    for path in files:
        if os.path.abspath(path) in listed:
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = header.get("SeriesInstanceUID")
        except Exception:
            continue  # not DICOM at all (a README, a DICOMDIR's siblings): not part of any series
        if uid in series:
            raise CorruptImageError(f"{path.name}: belongs to series {uid} but is not a readable image slice (no "
                                    "pixel data?)")
    return series


def _choose_series(source: str, series: dict[str, list[str]], series_uid: str | None) -> list[str]:
    if not series:
        raise InputError(f"{source}: no DICOM image series found")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{source}: series {series_uid} not found; it holds {sorted(series)}")
        return series[series_uid]
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(series.items()))
        raise AmbiguousSeriesError(f"{source}: {len(series)} DICOM series; choose one with a series UID: {listing}")
    return next(iter(series.values()))


def _dicom_headers(files: list[str]) -> list:
    import pydicom

    headers = []
    for name in files:
        try:
            ds = pydicom.dcmread(name)
        except Exception as exc:
            raise CorruptImageError(f"{Path(name).name}: not a readable DICOM file ({exc})") from exc
        if "PixelData" not in ds:
            raise CorruptImageError(f"{Path(name).name}: DICOM file has no pixel data")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_compressed:  # ITK pads short pixel data silently
            try:
                needed = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                          * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
            except (AttributeError, TypeError, ValueError) as exc:
                raise CorruptImageError(f"{Path(name).name}: image size attributes are missing or malformed "
                                        f"({exc})") from exc
            if len(ds.PixelData) < needed:
                raise CorruptImageError(f"{Path(name).name}: {len(ds.PixelData):,} bytes of pixel data where "
                                        f"{ds.Rows} x {ds.Columns} pixels need {needed:,}")
        del ds.PixelData
        headers.append(ds)
    return headers


def _check_slice_spacing(source: str, headers: list) -> None:
    """Refuse a series with a missing slice (a gap wider than 1.5 times the usual step)."""
    if len(headers) < 2:
        raise UnsupportedImageError(f"{source}: a single DICOM slice is not a 3D volume")
    try:
        row, col = np.asarray(headers[0].ImageOrientationPatient, float).reshape(2, 3)
        positions = np.array([np.asarray(h.ImagePositionPatient, float) for h in headers])
    except (AttributeError, ValueError) as exc:
        raise CorruptImageError(f"{source}: slices lack ImagePositionPatient/ImageOrientationPatient") from exc
    steps = np.diff(positions @ np.cross(row, col))
    typical = np.median(np.abs(steps))
    if typical <= 0 or np.any(np.abs(steps) > 1.5 * typical) or np.any(np.abs(steps) < 0.5 * typical):
        raise CorruptImageError(f"{source}: uneven slice positions (steps {np.round(steps, 3).tolist()} mm): a slice "
                                "is missing or duplicated")


def _read_dicom_files(source: str, files: list[str], limits: ReadLimits) -> Volume:
    headers = _dicom_headers(files)
    _check_slice_spacing(source, headers)
    voxels = len(files) * int(headers[0].Rows) * int(headers[0].Columns)
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(f"{source}: series declares {voxels:,} voxels, over the limit of "
                                 f"{limits.max_voxels:,}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CorruptImageError(f"{source}: ITK cannot decode the series: {str(exc).strip().splitlines()[-1]}") from exc
    return Volume(sitk.GetArrayFromImage(image), Geometry.of(image), source, "dicom", headers)


def read_dicom(path: Path, series_uid: str | None, limits: ReadLimits) -> Volume:
    if path.is_dir():
        files = _choose_series(str(path), list_dicom_series(path), series_uid)
        return _read_dicom_files(str(path), files, limits)
    with tempfile.TemporaryDirectory(prefix="isl-dicom-") as tmp:
        safe_extract_zip(path, Path(tmp), limits)
        files = _choose_series(path.name, list_dicom_series(Path(tmp)), series_uid)
        return _read_dicom_files(path.name, files, limits)


# ---------------------------------------------------------------------------------------------- public
