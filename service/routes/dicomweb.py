"""/dicomweb/studies: DICOMweb STOW-RS for PACS and DICOM routers. The multipart/related body is streamed to
disk part by part; each image series of the study becomes a job, or, when the default model takes several sequences,
the whole study one job whose series are assigned to the sequences by their descriptions (the workers push the DICOM
SEG back: see worker/tasks/stow.py)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from jobstore.records import InputFile, JobOptions
from service.deps import QueueDep, SettingsDep, StorageDep, StoreDep, Tenant
from service.intake import chosen_model, enqueue, model_sequences, staging
from service.storage import Storage
from service.views import Problem

router = APIRouter()


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
    """Write each part of the request body to folder/NNNNN.dcm, streaming; over `limit` bytes: OverflowError."""
    from python_multipart.multipart import MultipartParser

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    state = {"fh": None, "size": 0}

    def on_part_begin():
        path = folder / f"{len(paths):05d}.dcm"
        paths.append(path)
        state["fh"] = open(path, "wb")  # closed by on_part_end, or below

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


@router.post("/dicomweb/studies", tags=["DICOMweb"],
             responses={400: {"model": Problem}, 401: {"model": Problem}, 413: {"model": Problem},
                        415: {"model": Problem}, 422: {"model": Problem}},
             summary="DICOMweb STOW-RS: store a study (multipart/related of application/dicom); each series becomes a "
                     "job (each study, for a default model of several sequences)",
             description="For PACS and DICOM routers. The job ids come back in the `X-ISL-Jobs` header and as "
                         "RetrieveURL (0008,1190) values; each result is available as DICOM SEG and, when "
                         "`ISL_STOW_URL` is set, pushed there by the worker.")
async def stow(request: Request, who: Tenant, settings: SettingsDep, store: StoreDep, storage: StorageDep,
               queue: QueueDep) -> JSONResponse:
    model = chosen_model(settings, None)  # the default model: 422 before the body is read when it is missing
    sequences = model_sequences(settings, model)
    with staging(settings) as root:
        series, instances = await _receive_study(request, root / "parts", settings.max_upload_bytes)
        if len(sequences) > 1:  # a model of several sequences: each study is one job, its series its sequences
            studies: dict[str, dict[str, list[str]]] = {}
            for uid, files in series.items():
                studies.setdefault(instances[files[0]][2], {})[uid] = files
            staged = [await _stage_study(uid, study, root / f"s{i}", sequences)
                      for i, (uid, study) in enumerate(sorted(studies.items()))]
        else:
            staged = [await _stage_series(uid, files, root / f"s{i}")
                      for i, (uid, files) in enumerate(sorted(series.items()))]
        options = JobOptions(model=model, atlases=None, priority=5, stow=True)
        jobs = [enqueue(store, storage, queue, who, folder, inputs, options, actor=request.state.actor)
                for folder, inputs in staged]
    urls = [str(request.url_for("get_job", job_id=j.id)) for j in jobs]
    body, failed = _stow_response(urls, series, instances)
    return JSONResponse(body, 202 if failed else 200, media_type="application/dicom+json",
                        headers={"X-ISL-Jobs": ",".join(j.id for j in jobs)})


async def _receive_study(request: Request, folder: Path, limit: int) -> tuple[dict[str, list[str]], dict]:
    """The body's parts on disk, grouped into series (read in the limited child): (series, instances)."""
    from service.validate import Invalid, group_series

    try:
        await receive_parts(request.stream(), request.headers.get("content-type", ""), folder, limit)
    except BadRequest as exc:
        raise HTTPException(415 if "Content-Type" in str(exc) or "accepted" in str(exc) else 400, str(exc)) from None
    except OverflowError as exc:
        raise HTTPException(413, str(exc)) from None
    try:
        series, instances = await asyncio.to_thread(group_series, folder)
    except Invalid as exc:
        raise HTTPException(422, f"the study could not be read: {exc}") from None
    if not series:
        raise HTTPException(422, "no DICOM image series among the parts")
    return series, instances


async def _stage_series(uid: str, files: list[str], staged: Path) -> tuple[Path, list[InputFile]]:
    """One series's slices moved to staged/dicom and read in the limited child; 422 when it is not readable."""
    from service.validate import Invalid, validate

    folder = staged / "dicom"
    folder.mkdir(parents=True)
    inputs = []
    for k, f in enumerate(files):
        dest = folder / f"{k:05d}.dcm"
        Path(f).rename(dest)
        inputs.append(InputFile(name=f"{uid}/{k:05d}", kind="dicom", path=f"dicom/{dest.name}",
                                bytes=dest.stat().st_size, sha256=Storage.sha256(dest)))
    try:
        await asyncio.to_thread(validate, folder)
    except Invalid as exc:
        raise HTTPException(422, f"series {uid}: {exc}") from None
    return staged, inputs


async def _stage_study(study_uid: str, series: dict[str, list[str]], staged: Path,
                       sequences: list[str]) -> tuple[Path, list[InputFile]]:
    """All the slices of study `study_uid` moved to staged/dicom, its series assigned to the model's `sequences` by
    description in the limited child; 422 listing the series when a sequence has none or several."""
    from service.validate import Invalid, validate_study

    folder = staged / "dicom"
    folder.mkdir(parents=True)
    inputs = []
    for uid, files in sorted(series.items()):
        for f in files:
            dest = folder / f"{len(inputs):05d}.dcm"
            Path(f).rename(dest)
            inputs.append(InputFile(name=f"{uid}/{dest.stem}", kind="dicom", path=f"dicom/{dest.name}",
                                    bytes=dest.stat().st_size, sha256=Storage.sha256(dest)))
    try:
        await asyncio.to_thread(validate_study, folder, sequences, {})
    except Invalid as exc:
        raise HTTPException(422, f"study {study_uid or '(no Study Instance UID)'}, for a model of the sequences "
                                 f"{', '.join(sequences)}: {exc}") from None
    return staged, inputs


def _stow_response(urls: list[str], series: dict[str, list[str]], instances: dict) -> tuple[dict, list]:
    """The STOW-RS answer (DICOM JSON): RetrieveURLs, the instances stored, and the parts that were not an image
    slice of any series (failure reason 0110H, processing failure)."""
    taken = {f for files in series.values() for f in files}

    def ref(cls: str, inst: str) -> dict:
        return {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [inst]}}

    stored = [ref(*instances[f][:2]) for f in sorted(taken) if f in instances]
    failed = [ref(*uids[:2]) | {"00081197": {"vr": "US", "Value": [0x0110]}} for f, uids in sorted(instances.items())
              if f not in taken]
    body = {"00081190": {"vr": "UR", "Value": urls}, "00081199": {"vr": "SQ", "Value": stored}}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    return body, failed
