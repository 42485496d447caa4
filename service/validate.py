"""Validation of an untrusted upload in a limited child process: the parsers (SimpleITK, pydicom, zlib) see
hostile bytes there, under a memory and CPU-time cap, so that a parser bug or a bomb costs a child, not the
API. Run as `python -m service.validate PATH`; prints one JSON line."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

MEMORY_BYTES = 3 << 30
CPU_SECONDS = 60


class Invalid(Exception):
    pass


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child(args: list[str], timeout: float) -> dict:
    """Run `python -m service.validate ARGS` under the limits; its JSON answer, or Invalid with the reason."""
    try:
        out = subprocess.run([sys.executable, "-m", "service.validate", *args], capture_output=True, text=True,
                             timeout=timeout, preexec_fn=_limit, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        raise Invalid(f"reading it took longer than {timeout:.0f} s") from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise Invalid(f"it could not be read within the parser's limits (exit {out.returncode})")
    result = json.loads(lines[-1])
    if "error" in result:
        raise Invalid(result["error"])
    return result


def validate(path: Path, timeout: float = 120) -> dict:
    """{'shape': [...], 'spacing': [...], 'kind': ...} of a readable scan, or Invalid with the reason."""
    return _child([str(path)], timeout)


def group_series(folder: Path, timeout: float = 120) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(series instance UID -> file paths of its slices, file path -> [SOP class UID, SOP instance UID]) of the
    DICOM files under `folder`, read in the limited child."""
    result = _child(["--series", str(folder)], timeout)
    return result["series"], result["instances"]


def _series_main(folder: str) -> None:
    import pydicom

    from segmentation.errors import InputError
    from segmentation.io import list_dicom_series

    try:
        instances = {}
        for p in sorted(Path(folder).iterdir()):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
                instances[str(p)] = [str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))]
            except Exception:  # not DICOM: reported as a failed part
                instances[str(p)] = ["", ""]
        print(json.dumps({"series": list_dicom_series(Path(folder)), "instances": instances}))
    except InputError as exc:
        print(json.dumps({"error": str(exc)}))


def main(path: str) -> None:
    from segmentation.errors import InputError
    from segmentation.io import read_image

    try:
        v = read_image(Path(path))
        print(json.dumps({"shape": list(v.array.shape), "spacing": list(v.geometry.spacing), "kind": v.kind}))
    except InputError as exc:
        print(json.dumps({"error": str(exc).replace(str(Path(path).parent) + "/", "")}))
    except MemoryError:
        print(json.dumps({"error": "reading it needs more memory than an upload may use"}))


if __name__ == "__main__":
    _series_main(sys.argv[2]) if sys.argv[1] == "--series" else main(sys.argv[1])
