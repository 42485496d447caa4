"""Validation of an untrusted upload in a limited child process: the parsers (SimpleITK, pydicom, zlib) see
hostile bytes there, under a memory and CPU-time cap, so that a parser bug or a bomb costs a child, not the
API. Children are forked from a server process that has the readers imported already (multiprocessing's
forkserver), one child per upload, so that a check costs milliseconds of start-up instead of an interpreter's."""
from __future__ import annotations

import multiprocessing
import resource
from pathlib import Path

MEMORY_BYTES = 3 << 30
CPU_SECONDS = 60
_context = None


class Invalid(Exception):
    pass


def _limit(cpu_seconds: int = CPU_SECONDS) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["service.validate", "imaging.io", "pydicom", "nibabel"])
    return _context


def _run(conn, kind: str, path: str, series_uid: str | None = None, extra: dict | None = None) -> None:
    """In the child: limits first, then the reader; one answer on the pipe (a crash sends none). Each further
    sequence of a study or correction to co-register adds CPU_SECONDS (a rigid alignment takes seconds to tens)."""
    _limit(CPU_SECONDS * max(1, len((extra or {}).get("sequences") or [])))
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    if kind == "series":
        conn.send(_series(path))
    elif kind == "correction":
        conn.send(_correction(path, series_uid, **extra))
    elif kind == "study":
        conn.send(_study(path, **extra))
    else:
        conn.send(_volume(path, series_uid))
    conn.close()


def _child(kind: str, path: Path, timeout: float, series_uid: str | None = None, extra: dict | None = None) -> dict:
    """The child's answer, or Invalid with the reason."""
    ctx = _ctx()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(send, kind, str(path), series_uid, extra), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout):
            proc.kill()
            raise Invalid(f"reading it took longer than {timeout:.0f} s")
        try:
            result = receive.recv()
        except EOFError:  # the child died: a memory or CPU limit, or a parser crash
            result = None
    finally:
        receive.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is None:
        raise Invalid(f"it could not be read within the parser's limits (exit {proc.exitcode})")
    if "error" in result:
        raise Invalid(result["error"])
    return result


def validate(path: Path, timeout: float = 120, series_uid: str | None = None) -> dict:
    """{'shape': [...], 'spacing': [...], 'kind': ...} of a readable scan (of series `series_uid` when given), or
    Invalid with the reason."""
    return _child("volume", path, timeout, series_uid)


def validate_study(path: Path, sequences: list[str], chosen: dict[str, str], timeout: float = 120) -> dict:
    """{'sequences': [{'shape', 'spacing'}, ...]} of a DICOM study (a zip of several series) whose series are assigned
    to the model's `sequences` by description or by `chosen` (sequence -> series UID), or Invalid with the reason
    (a sequence with no series or several, listing the study's series)."""
    return _child("study", path, timeout, None, {"sequences": sequences, "chosen": chosen})


def group_series(folder: Path, timeout: float = 120) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(series instance UID -> file paths of its slices, file path -> [SOP class UID, SOP instance UID, study instance
    UID]) of the DICOM files under `folder`, read in the limited child."""
    result = _child("series", folder, timeout)
    return result["series"], result["instances"]


def check_correction(path: Path, scans: list[Path], series_uid: str | None, mask: Path, labels: dict[int, str],
                     out: Path, sequences: list[str] | None = None, sequence_series: dict[str, str] | None = None,
                     timeout: float = 300) -> dict:
    """Read a correction (NIfTI label map or DICOM SEG) onto the grid of the job's scan (`scans`: its stored inputs,
    of series `series_uid`; for a model of several `sequences`, one per sequence or one DICOM study assigned by
    `sequence_series`, as the worker read them), in the limited child; write it and the scan as NIfTI into `out`
    (label.nii.gz, image.nii.gz, and image_0001.nii.gz... for the further sequences on the first one's grid) and return
    what it changed against the job's refined mask `mask`, per label. Invalid with the reason when the grid, the
    labels or the references do not match."""
    return _child("correction", path, timeout, series_uid,
                  {"scans": [str(s) for s in scans], "mask": str(mask), "labels": labels, "out": str(out),
                   "sequences": sequences, "sequence_series": sequence_series or None})


def _correction(path: str, series_uid: str | None, scans: list[str], mask: str, labels: dict, out: str,
                sequences: list[str] | None, sequence_series: dict[str, str] | None) -> dict:
    import numpy as np

    from imaging.corrections import is_dicom, read_correction
    from imaging.errors import InputError
    from imaging.files import file_sha256
    from imaging.io import read_image, write_image, write_label_map
    from imaging.metrics import dice
    from imaging.sequences import read_sequences

    labels = {int(v): n for v, n in labels.items()}
    try:
        volumes, _ = read_sequences([Path(p) for p in scans], series_uid, sequences, sequence_series)
        volume = volumes[0]
        corrected = read_correction(Path(path), volume, labels)
        refined = read_image(Path(mask)).array
    except InputError as exc:
        return {"error": str(exc).replace(str(Path(path).parent) + "/", "")}
    except MemoryError:
        return {"error": "reading it needs more memory than an upload may use"}
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    names = {v: n for v, n in labels.items() if v != 0}
    scores = dice(refined, corrected, list(names))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_label_map(corrected, volume.geometry, Path(out) / "label.nii.gz")
    write_image(volume.array, volume.geometry, Path(out) / "image.nii.gz")
    for k, further in enumerate(volumes[1:], 1):  # the further sequences, on the first one's grid
        write_image(further.array, further.geometry, Path(out) / f"image_{k:04d}.nii.gz")
    per_label = {name: {"refined_ml": round(float(np.count_nonzero(refined == v)) * voxel_ml, 3),
                        "corrected_ml": round(float(np.count_nonzero(corrected == v)) * voxel_ml, 3),
                        "dice_refined_vs_corrected": round(float(scores[v]), 4),
                        **_distances(refined == v, corrected == v, volume.geometry)} for v, name in names.items()}
    return {"source": "dicom-seg" if is_dicom(path) else "nifti", "per_label": per_label,
            "voxels_changed": int(np.count_nonzero(refined != corrected)),
            "label_sha256": file_sha256(Path(out) / "label.nii.gz")}


def _distances(a, b, geometry) -> dict:
    """Hausdorff and average Hausdorff distance (mm, SimpleITK) between two masks on one grid; absent when either
    is empty (no distance to measure)."""
    import numpy as np
    import SimpleITK as sitk

    if not a.any() or not b.any():
        return {}
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(geometry.image_from_array(a.astype(np.uint8)), geometry.image_from_array(b.astype(np.uint8)))
    return {"hausdorff_mm": round(f.GetHausdorffDistance(), 3),
            "average_hausdorff_mm": round(f.GetAverageHausdorffDistance(), 3)}


def _series(folder: str) -> dict:
    import pydicom

    from imaging.dicom import list_dicom_series
    from imaging.errors import InputError

    try:
        instances = {}
        for p in sorted(Path(folder).iterdir()):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True,
                                     specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
                instances[str(p)] = [str(ds.get(t, "")) for t in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
            except Exception:  # broad on purpose: an untrusted file, not DICOM or damaged: reported as a failed part
                instances[str(p)] = ["", "", ""]
        return {"series": list_dicom_series(Path(folder)), "instances": instances}
    except InputError as exc:
        return {"error": str(exc)}


def _study(path: str, sequences: list[str], chosen: dict[str, str]) -> dict:
    from imaging.dicom import read_study
    from imaging.errors import InputError
    from imaging.io import ReadLimits

    try:
        volumes = read_study(Path(path), sequences, chosen, ReadLimits())
        return {"sequences": [{"shape": list(v.array.shape), "spacing": list(v.geometry.spacing)} for v in volumes]}
    except InputError as exc:
        return {"error": str(exc).replace(str(Path(path).parent) + "/", "")}
    except MemoryError:
        return {"error": "reading it needs more memory than an upload may use"}


def _volume(path: str, series_uid: str | None = None) -> dict:
    from imaging.errors import InputError
    from imaging.io import read_image

    try:
        v = read_image(Path(path), series_uid=series_uid)
        return {"shape": list(v.array.shape), "spacing": list(v.geometry.spacing), "kind": v.kind}
    except InputError as exc:
        return {"error": str(exc).replace(str(Path(path).parent) + "/", "")}
    except MemoryError:
        return {"error": "reading it needs more memory than an upload may use"}
