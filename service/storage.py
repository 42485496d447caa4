"""Inputs and results under one storage root, written atomically (temporary file, fsync, rename) and
checksummed (sha256), so that a reader never sees half a file and a served file can be verified."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

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

    def write_stream(self, dest: Path, chunks, limit: int) -> tuple[int, str]:
        """Write an iterable of byte chunks to `dest` atomically; (size, sha256). Over `limit` bytes: TooLarge,
        and nothing stays behind."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        h, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"upload exceeds {limit} bytes")
                    h.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return size, h.hexdigest()

    def write_bytes(self, dest: Path, data: bytes) -> str:
        return self.write_stream(dest, [data], len(data))[1]

    @staticmethod
    def sha256(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def verify(self, path: Path, digest: str) -> bool:
        return path.is_file() and self.sha256(path) == digest

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
