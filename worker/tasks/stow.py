"""DICOMweb STOW-RS, the pushing half: a worker sends a DICOM SEG result to the endpoint in ISL_STOW_URL."""
from __future__ import annotations

import uuid
from pathlib import Path

import httpx


def push(url: str, files: list[Path], api_key: str = "", timeout: float = 120) -> None:
    """POST the files to a STOW-RS endpoint as one multipart/related request; raises on any failure."""
    boundary = uuid.uuid4().hex
    head = b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    body = b"".join(head + f.read_bytes() + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    if api_key:
        headers["X-API-Key"] = api_key
    r = httpx.post(url, content=body, headers=headers, timeout=timeout)
    if r.status_code >= 300:
        raise RuntimeError(f"STOW-RS {url} answered {r.status_code}: {r.text[:300]}")
