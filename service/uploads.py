"""Receiving an upload: each file's type sniffed from its bytes (never from its name or the client's
Content-Type), streamed into a staging folder under a size limit, then read in the limited child process
(service/validate.py)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from fastapi import HTTPException, UploadFile
from starlette import formparsers

from jobstore.records import InputFile
from service.storage import Storage, TooLarge

GZIP, ZIP, DICM = b"\x1f\x8b", b"PK\x03\x04", b"DICM"
STORED_AS = {"nifti-gz": "image.nii.gz", "nifti": "image.nii", "zip": "series.zip"}  # else dicom/NNNNN.dcm


def sniff(head: bytes) -> str | None:
    """'zip', 'nifti-gz', 'nifti' or 'dicom' from a file's first 512 bytes; None for anything else."""
    if head.startswith(ZIP):
        return "zip"
    if head.startswith(GZIP):
        return "nifti-gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"n+2\x00"):
        return "nifti"
    if len(head) >= 132 and head[128:132] == DICM:
        return "dicom"
    return None


def spool_under(folder: Path) -> Path:
    """Starlette spools each part of a multipart upload that outgrows 1 MiB to a temporary file, by default in the
    system's temporary folder, outside the storage root whose free space ISL_MIN_FREE_MB watches; here, under
    `folder` (a setting of Starlette's parser for the whole process: an API process has one storage root). The files
    are unlinked as they are made, so a process that dies leaves none behind."""
    folder.mkdir(parents=True, exist_ok=True)
    formparsers.SpooledTemporaryFile = functools.partial(tempfile.SpooledTemporaryFile, dir=str(folder))
    return folder


def receive(files: list[UploadFile], staging: Path, limit: int, series_uid: str | None = None,
            sequences: list[str] | None = None, sequence_series: dict[str, str] | None = None) -> list[InputFile]:
    """Store the uploaded files under `staging` after sniffing their type from their bytes; refuse what is not one
    scan: one NIfTI, one zip, or the DICOM files of a series (`series_uid` chooses one when they hold several). For a
    model of several sequences (`sequences`: their names, in the model's channel order), one NIfTI or zip per
    sequence, in that order, each stored in its own folder (sequence_0/, sequence_1/...); or one zip of a DICOM study
    whose series are assigned to the sequences by description or by `sequence_series` (sequence -> series UID)."""
    if not files:
        raise HTTPException(422, "no file uploaded (multipart field 'files')")
    several = sequences is not None and len(sequences) > 1
    study = several and len(files) == 1 and sniff(_head(files[0])) == "zip"
    if study and series_uid:
        raise HTTPException(422, "series_uid chooses the series of a one-sequence upload; the series of a study for a "
                                 "model of several sequences are chosen by description or by sequence_series")
    if sequence_series and not study:
        raise HTTPException(422, "sequence_series assigns the series of one DICOM study (one zip) to the sequences of "
                                 "a model of several sequences; this upload is not one")
    if several and not study and len(files) != len(sequences):  # before a byte is stored
        missing = f"; missing {', '.join(sequences[len(files):])}" if len(files) < len(sequences) else ""
        raise HTTPException(422, f"the model takes {len(sequences)} sequences, one file each in this order: "
                                 f"{', '.join(sequences)}; {len(files)} given{missing} (or one zip of a DICOM study "
                                 "holding a series per sequence)")
    if study:
        from service.validate import Invalid, validate_study

        inputs = [_store(files[0], 0, staging, limit, limit)]
        try:
            validate_study(staging / inputs[0].path, sequences, sequence_series or {})
        except Invalid as exc:
            raise HTTPException(422, f"{files[0].filename!r} (a DICOM study for the sequences "
                                     f"{', '.join(sequences)}): {exc}") from None
        return inputs
    inputs: list[InputFile] = []
    for i, up in enumerate(files):
        inputs.append(_store(up, i, staging, limit - sum(x.bytes for x in inputs), limit,
                             f"sequence_{i}/" if several else ""))
    kinds = [x.kind for x in inputs]
    if several and "dicom" in kinds:
        raise HTTPException(422, f"the model takes {len(sequences)} sequences ({', '.join(sequences)}): send each as "
                                 "one NIfTI or one zip of its DICOM series, or the study as one zip, not loose DICOM "
                                 "files")
    if not several and len(files) > 1 and set(kinds) != {"dicom"}:
        raise HTTPException(422, "several files must all be DICOM files of one series; send a NIfTI or a zip alone")
    from service.validate import Invalid, validate

    for i, x in enumerate(inputs if several else inputs[:1]):
        target = staging / ("dicom" if kinds[0] == "dicom" else x.path)
        try:
            validate(target, series_uid=series_uid)
        except Invalid as exc:
            names = files[i].filename if len(files) == 1 or several else f"the {len(files)} DICOM files"
            what = f" (sequence {sequences[i]})" if several else ""
            raise HTTPException(422, f"{names!r}{what}: {exc}") from None
    return inputs


def _head(up: UploadFile) -> bytes:
    head = up.file.read(512)
    up.file.seek(0)
    return head


def _store(up: UploadFile, i: int, staging: Path, room: int, limit: int, folder: str = "") -> InputFile:
    """The i-th uploaded file, sniffed and written under `staging`/`folder` (at most `room` bytes of the upload's
    `limit`)."""
    kind = sniff(_head(up))
    if kind is None:
        raise HTTPException(422, f"{up.filename!r}: not a NIfTI, DICOM or zip file (judged by its bytes, not its name)")
    name = folder + STORED_AS.get(kind, f"dicom/{i:05d}.dcm")
    try:
        size, digest = Storage.write_stream(staging / name, iter(lambda: up.file.read(1 << 20), b""), room)
    except TooLarge:
        raise HTTPException(413, f"upload exceeds the limit of {limit} bytes") from None
    return InputFile(name=up.filename, kind=kind, path=name, bytes=size, sha256=digest)
