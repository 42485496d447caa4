"""DICOM input: a series from a folder or a .zip archive (members checked before anything is extracted),
its slices' headers and pixel data checked before ITK decodes them (a missing slice, short pixel data,
several series without a choice are refused with the reason)."""
from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imaging.errors import (
    AmbiguousSeriesError,
    CorruptImageError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
)
from imaging.io import Geometry, ReadLimits, Volume


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
    """Refuse, before anything is queued, a series that is not one regular stack of parallel slices: slices of
    several orientations (a localizer, a multi-angle series), a gantry tilt (slices stepping sideways, which a
    volume reader would silently shear), or a missing or duplicated slice (a gap wider than 1.5 times the usual
    step, or under half of it). Each reason says what to send instead."""
    if len(headers) < 2:
        raise UnsupportedImageError(f"{source}: a single DICOM slice is not a 3D volume")
    try:
        orientations = np.array([np.asarray(h.ImageOrientationPatient, float) for h in headers]).reshape(-1, 2, 3)
        positions = np.array([np.asarray(h.ImagePositionPatient, float) for h in headers])
    except (AttributeError, ValueError) as exc:
        raise CorruptImageError(f"{source}: slices lack ImagePositionPatient/ImageOrientationPatient") from exc
    row, col = orientations[0]
    tilted = np.abs(orientations - orientations[0]).max(axis=(1, 2)) > 1e-3
    if tilted.any():
        raise UnsupportedImageError(
            f"{source}: the slices are not all parallel ({int(tilted.sum())} of {len(headers)} differ in "
            "ImageOrientationPatient from the first): a localizer or a series of several stacks; send one stack "
            "of parallel slices (one series per orientation)")
    normal = np.cross(row, col)
    steps = np.diff(positions @ normal)
    sideways = np.linalg.norm(np.diff(positions, axis=0) - steps[:, None] * normal, axis=1)
    typical = np.median(np.abs(steps))
    if typical > 0 and np.median(sideways) > 0.05 * typical:
        angle = float(np.degrees(np.arctan2(np.median(sideways), typical)))
        raise UnsupportedImageError(
            f"{source}: the slices step {np.median(sideways):.2f} mm sideways for every {typical:.2f} mm along "
            f"their normal (a gantry tilt of about {angle:.1f} degrees); refused rather than read as a sheared "
            "volume: send a series reconstructed without tilt (or resampled to an orthogonal grid)")
    if typical <= 0 or np.any(np.abs(steps) > 1.5 * typical) or np.any(np.abs(steps) < 0.5 * typical):
        raise CorruptImageError(f"{source}: uneven slice positions (steps {np.round(steps, 3).tolist()} mm): a slice "
                                "is missing or duplicated")


def _read_multiframe(source: str, path: str, header, limits: ReadLimits) -> Volume:
    """One enhanced (multi-frame) CT or MR object: its frames' planes from the functional groups, checked as a
    series' slices are, then read by ITK (GDCM), which places the frames from the same groups."""
    from types import SimpleNamespace

    frames = int(header.NumberOfFrames)
    shared = (header.get("SharedFunctionalGroupsSequence") or [{}])[0]
    planes = []
    for i, group in enumerate(header.get("PerFrameFunctionalGroupsSequence") or []):
        try:
            orient = (group.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence"))[0]
            planes.append(SimpleNamespace(ImageOrientationPatient=orient.ImageOrientationPatient,
                                          ImagePositionPatient=group.PlanePositionSequence[0].ImagePositionPatient))
        except (AttributeError, IndexError, TypeError):
            raise UnsupportedImageError(
                f"{source}: a multi-frame object whose frame {i + 1} has no plane position or orientation (a cine "
                "loop or a 2D multi-frame image, not a volume); send a 3D CT or MR series") from None
    if len(planes) != frames:
        raise UnsupportedImageError(f"{source}: a multi-frame object with {frames} frames but per-frame geometry for "
                                    f"{len(planes)} (not an enhanced CT/MR volume); send a 3D CT or MR series")
    _check_slice_spacing(source, planes)
    positions = np.array([np.asarray(p.ImagePositionPatient, float) for p in planes])
    along = np.diff(positions @ np.cross(*np.asarray(planes[0].ImageOrientationPatient, float).reshape(2, 3)))
    if not (np.all(along > 0) or np.all(along < 0)):
        raise UnsupportedImageError(f"{source}: the frames of this multi-frame object are not stored in spatial "
                                    "order; export it as single-frame slices")
    voxels = frames * int(header.Rows) * int(header.Columns)
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(f"{source}: object declares {voxels:,} voxels, over the limit of "
                                 f"{limits.max_voxels:,}")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise CorruptImageError(f"{source}: ITK cannot decode the multi-frame object: "
                                f"{str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetSize()[2] != frames:
        raise UnsupportedImageError(f"{source}: ITK read {image.GetSize()} from {frames} frames; export the object as "
                                    "single-frame slices")
    return Volume(sitk.GetArrayFromImage(image), Geometry.of(image), source, "dicom", [header])


def _read_dicom_files(source: str, files: list[str], limits: ReadLimits) -> Volume:
    headers = _dicom_headers(files)
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(source, files[0], headers[0], limits)
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


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def assign_series(source: str, series: dict[str, list[str]], channels: list[str],
                  chosen: dict[str, str] | None = None) -> list[list[str]]:
    """The files of the series of each sequence (channel) of a model, from a study's series: the series named for it
    in `chosen` (channel -> series UID), else the one series whose description is the channel's name, else the one
    whose description holds it (case, spaces and punctuation aside: "FLAIR" finds "AX T2 FLAIR"). InputError listing
    the series when a sequence has none or several."""
    import pydicom

    chosen = chosen or {}
    unknown = sorted(set(chosen) - set(channels))
    if unknown:
        raise InputError(f"{source}: series given for {unknown}, which the model does not take ({', '.join(channels)})")
    described = {uid: str(pydicom.dcmread(files[0], stop_before_pixels=True,
                                          specific_tags=["SeriesDescription"]).get("SeriesDescription", ""))
                 for uid, files in series.items()}
    listing = "; ".join(f"{uid} ({described[uid] or 'no description'}, {len(series[uid])} files)"
                        for uid in sorted(series))
    out = []
    for name in channels:
        if name in chosen:
            uid = chosen[name]
            if uid not in series:
                raise InputError(f"{source}: series {uid} (given for {name}) not found; it holds: {listing}")
        else:
            key = _normal(name)
            matches = [uid for uid, d in described.items() if key and key == _normal(d)] or \
                [uid for uid, d in described.items() if key and key in _normal(d)]  # "T1" is T1, not "T1C"
            if len(matches) != 1:
                found = "no series" if not matches else f"{len(matches)} series"
                raise InputError(f"{source}: {found} whose description names sequence {name}; name its series "
                                 f"(--sequence-series {name}=UID, or the API's sequence_series field). It holds: "
                                 f"{listing}")
            uid = matches[0]
        out.append(series[uid])
    return out


def read_study(path: Path, channels: list[str], chosen: dict[str, str] | None, limits: ReadLimits) -> list[Volume]:
    """One volume per sequence of a model from a DICOM study (a folder or a .zip holding several series), each
    assigned by `assign_series`."""
    def read(folder: Path, source: str) -> list[Volume]:
        series = list_dicom_series(folder)
        if not series:
            raise InputError(f"{source}: no DICOM image series found")
        return [_read_dicom_files(source, files, limits) for files in assign_series(source, series, channels, chosen)]

    if path.is_dir():
        return read(path, str(path))
    with tempfile.TemporaryDirectory(prefix="isl-dicom-") as tmp:
        safe_extract_zip(path, Path(tmp), limits)
        return read(Path(tmp), path.name)


def read_dicom(path: Path, series_uid: str | None, limits: ReadLimits) -> Volume:
    if path.is_dir():
        files = _choose_series(str(path), list_dicom_series(path), series_uid)
        return _read_dicom_files(str(path), files, limits)
    with tempfile.TemporaryDirectory(prefix="isl-dicom-") as tmp:
        safe_extract_zip(path, Path(tmp), limits)
        files = _choose_series(path.name, list_dicom_series(Path(tmp)), series_uid)
        return _read_dicom_files(path.name, files, limits)


# ---------------------------------------------------------------------------------------------- public
