"""Inputs and results under one storage root, written atomically (imaging/files.py: temporary file, fsync,
rename) and checksummed (sha256), so that a reader never sees half a file and a served file can be verified."""
from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from imaging.files import atomic_write, atomic_write_bytes, file_sha256

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class TooLarge(Exception):
    pass


class Storage:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "jobs" / job_id

    @staticmethod
    def write_stream(dest: Path, chunks: Iterable[bytes], limit: int) -> tuple[int, str]:
        """Write an iterable of byte chunks to `dest` atomically; (size, sha256). Over `limit` bytes: TooLarge,
        and nothing stays behind."""
        h, size = hashlib.sha256(), 0

        def write(tmp: str) -> None:
            nonlocal size
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"upload exceeds {limit} bytes")
                    h.update(chunk)
                    fh.write(chunk)

        atomic_write(dest, write)
        return size, h.hexdigest()

    @staticmethod
    def write_bytes(dest: Path, data: bytes) -> str:
        atomic_write_bytes(dest, data)
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def sha256(path: Path) -> str:
        return file_sha256(path)

    def verify(self, path: Path, digest: str) -> bool:
        return path.is_file() and self.sha256(path) == digest

    def input_paths(self, job_id: str) -> list[Path]:
        """The job's stored input, one path per sequence (a scan of one sequence has one)."""
        folder = self.job_dir(job_id) / "input"
        sequences = sorted(folder.glob("sequence_*"), key=lambda p: int(p.name.split("_")[1]))
        return [self._scan(s) for s in sequences] if sequences else [self._scan(folder)]

    def input_path(self, job_id: str) -> Path:
        """The job's stored input, its first sequence for a scan of several (see `input_paths`)."""
        return self.input_paths(job_id)[0]

    @staticmethod
    def _scan(folder: Path) -> Path:
        """A stored scan: its NIfTI file or DICOM zip, else its folder of DICOM files."""
        for name in ("image.nii.gz", "image.nii", "series.zip"):
            if (folder / name).is_file():
                return folder / name
        return folder / "dicom"

    def correction_dir(self, tenant: str, job_id: str, correction_id: str) -> Path:
        """Where a correction's files lie: outside the job's folder, so that the retention policy keeps them."""
        if not JOB_ID.match(job_id) or not JOB_ID.match(correction_id):
            raise ValueError(f"not a job or correction id: {job_id!r}, {correction_id!r}")
        return self.root / "corrections" / tenant / job_id / correction_id

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def reachable(self) -> bool:
        probe = self.root / ".probe"
        try:
            self.write_bytes(probe, b"ok")
            probe.unlink()
            return True
        except OSError:
            return False
