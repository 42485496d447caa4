"""DICOMweb STOW-RS: read a multipart/related body of application/dicom parts, and send DICOM files to a
STOW-RS endpoint."""
from __future__ import annotations

import uuid
from pathlib import Path

import httpx


class BadRequest(Exception):
    pass


def boundary_of(content_type: str) -> str:
    main, *params = [p.strip() for p in content_type.split(";")]
    if main.lower() != "multipart/related":
        raise BadRequest(f"Content-Type must be multipart/related; type=\"application/dicom\", not {main!r}")
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "type" and value.strip().strip('"').lower() != "application/dicom":
            raise BadRequest(f"only application/dicom parts are accepted, not {value.strip()!r}")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"')
    raise BadRequest("the multipart/related Content-Type has no boundary")


async def receive_parts(stream, content_type: str, folder: Path, limit: int) -> list[Path]:
    """Write each part of the request body to folder/NNNNN.dcm, streaming; over `limit` bytes: BadRequest."""
    from python_multipart.multipart import MultipartParser

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    state = {"fh": None, "size": 0}

    def on_part_begin():
        path = folder / f"{len(paths):05d}.dcm"
        paths.append(path)
        state["fh"] = open(path, "wb")

    def on_part_data(data, start, end):
        state["fh"].write(data[start:end])

    def on_part_end():
        state["fh"].close()
        state["fh"] = None

    parser = MultipartParser(boundary_of(content_type).encode(),
                             {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        async for chunk in stream:
            state["size"] += len(chunk)
            if state["size"] > limit:
                raise OverflowError(f"the body exceeds the limit of {limit} bytes")
            parser.write(chunk)
        parser.finalize()
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    if not paths:
        raise BadRequest("the multipart/related body holds no part")
    return paths


def push(url: str, files: list[Path], api_key: str = "", timeout: float = 120) -> None:
    """POST the files to a STOW-RS endpoint as one multipart/related request; raises on any failure."""
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
                    for f in files) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    if api_key:
        headers["X-API-Key"] = api_key
    r = httpx.post(url, content=body, headers=headers, timeout=timeout)
    if r.status_code >= 300:
        raise RuntimeError(f"STOW-RS {url} answered {r.status_code}: {r.text[:300]}")
