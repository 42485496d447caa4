"""The Python API behind `isl refine` and the Celery task: read a scan, refine it, write the masks and the
report (volumes per label, QA, timings, checksums) and the preview images (slices with both masks outlined)."""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from imaging.files import atomic_write_text, file_sha256
from imaging.io import Geometry, Volume, write_label_map
from imaging.sequences import read_sequences
from isl.bundle import ISLBundle
from isl.config import ISLConfig
from isl.refiner import Refiner, load_refiner
from segmentation.preprocess import to_native

log = logging.getLogger("isl.pipeline")


def label_volumes_ml(labels: np.ndarray, geometry: Geometry, names: dict[int, str]) -> dict[str, float]:
    """Volume of each foreground label in mL (SimpleITK's label statistics; 0 for a label not present)."""
    stats = sitk.LabelShapeStatisticsImageFilter()  # sizes only: perimeter and Feret diameter cost 10x more
    stats.ComputePerimeterOff()
    stats.ComputeFeretDiameterOff()
    stats.Execute(geometry.image_from_array(labels.astype(np.uint16)))
    present = set(stats.GetLabels())
    return {names[v]: round(stats.GetPhysicalSize(v) / 1000.0 if v in present else 0.0, 3) for v in names if v != 0}


def refine_volumes(refiner: Refiner, volumes: list[Volume], progress=None,
                   extra_atlases=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Refined and baseline label maps on the first volume's native grid, plus QA and stage timings."""
    t0 = time.perf_counter()
    image, canonical = refiner.pre.images(volumes)
    t_pre = time.perf_counter() - t0
    result = refiner.refine(image, progress, extra_atlases)
    t0 = time.perf_counter()
    native = volumes[0].geometry
    refined, baseline = to_native(result.probs, canonical, native), to_native(result.baseline, canonical, native)
    seconds = {"preprocess": t_pre, **result.seconds, "to_native": time.perf_counter() - t0}
    return refined, baseline, {"qa": result.qa, "seconds": seconds}


def write_outputs(refined: np.ndarray, baseline: np.ndarray, source: Volume, refiner: Refiner,
                  out: Path) -> dict[str, Path]:
    """mask.nii.gz and baseline.nii.gz on the input's grid; for a DICOM input whose headers allow them
    (imaging.dicomseg.export_problem), seg.dcm (DICOM SEG) and rtstruct.dcm (RT Structure Set), both
    referencing the input series."""
    from imaging.codes import segment_codes
    from imaging.dicomseg import export_problem, write_dicom_seg
    from imaging.rtstruct import write_rtstruct

    out.mkdir(parents=True, exist_ok=True)
    outputs = {"mask": write_label_map(refined, source.geometry, out / "mask.nii.gz"),
               "baseline": write_label_map(baseline, source.geometry, out / "baseline.nii.gz")}
    if export_problem(source) is None:
        labels = refiner.bundle.segmentation.labels
        codes = segment_codes(labels, refiner.bundle.meta.get("dataset", {}).get("segment_codes"))
        outputs["dicom_seg"] = write_dicom_seg(refined, source, labels, out / "seg.dcm",
                                               software_version=refiner.bundle.version, codes=codes)
        outputs["rtstruct"] = write_rtstruct(refined, source, labels, out / "rtstruct.dcm",
                                             software_version=refiner.bundle.version, codes=codes)
    return outputs


def write_preview(source: Volume, baseline: np.ndarray, refined: np.ndarray, out: Path) -> dict:
    """Slices with both masks as outlines (imaging/preview.py), for the web console. A picture that cannot be
    made does not fail the job: the report says why it is missing."""
    from imaging.preview import render_previews

    try:
        index = render_previews(source.array, baseline, refined, source.geometry, out)
    except Exception as e:  # noqa: BLE001 - the mask is written and good; only its picture is missing
        log.warning("preview images of %s not made", source.source, exc_info=True)
        return {"written": False, "not_written_because": f"{type(e).__name__}: {e}"}
    return {"written": True, "index": f"{out.name}/preview.json",
            "slices": {plane: len(v) for plane, v in index["planes"].items()}}


def refine_file(inputs: str | Path | list, model_dir: str | Path | None, out_dir: str | Path, *, atlas_dir=None,
                cfg: ISLConfig | dict | None = None, series_uid: str | None = None, refiner: Refiner | None = None,
                progress=None, extra_atlases=None, sequence_series: dict[str, str] | None = None) -> dict:
    """Refine one scan given as a file/folder per channel; writes mask.nii.gz (and seg.dcm for DICOM
    input), baseline.nii.gz and report.json into `out_dir`, and returns the report. A loaded `refiner`
    (a worker's) is used as it is; otherwise the bundle `model_dir` is loaded with `cfg`. `extra_atlases`
    (isl.bundle.Atlases) join the bundle's atlases for this scan."""
    t_start = time.perf_counter()
    inputs = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    seconds = {}
    t0 = time.perf_counter()  # the input first: a file that cannot be read is refused before any model loads
    channels = (refiner.bundle.meta if refiner else ISLBundle.read_meta(model_dir))["dataset"]["channels"]
    volumes, sequences = read_sequences(inputs, series_uid, channels, sequence_series)
    seconds["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    refiner = refiner or load_refiner(model_dir, atlas_dir, cfg)
    seconds["load_model"] = time.perf_counter() - t0
    refined, baseline, info = refine_volumes(refiner, volumes, progress, extra_atlases)
    if len(volumes) > 1:
        info["qa"]["sequences"] = sequences
    seconds.update(info["seconds"])
    t0 = time.perf_counter()
    outputs = write_outputs(refined, baseline, volumes[0], refiner, Path(out_dir))
    seconds["write"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preview = write_preview(volumes[0], baseline, refined, Path(out_dir) / "preview")
    seconds["preview"] = time.perf_counter() - t0
    report = _report(inputs, outputs, refiner, volumes[0], refined, baseline, info["qa"], seconds, t_start)
    report["preview"] = preview
    atomic_write_text(Path(out_dir) / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _report(inputs, outputs, refiner: Refiner, source: Volume, refined, baseline, qa: dict, seconds: dict,
            t_start: float) -> dict:
    """The report; its total time includes the checksums and volumes computed here."""
    from imaging.dicomseg import export_problem

    geometry = source.geometry
    names = refiner.bundle.segmentation.labels
    files = {k: {"path": p.name, "sha256": file_sha256(p)} for k, p in outputs.items()}
    volumes = label_volumes_ml(refined, geometry, names), label_volumes_ml(baseline, geometry, names)
    seconds = seconds | {"total": time.perf_counter() - t_start}
    return {
        "input": [str(p) for p in inputs],
        "output": str(outputs["mask"]),
        "files": files,
        "model_version": refiner.bundle.version,
        "labels": {str(k): v for k, v in names.items()},
        "dicom_exports": {"written": [k for k in ("dicom_seg", "rtstruct") if k in outputs],
                          "not_written_because": export_problem(source)},
        "volumes_ml": volumes[0],
        "baseline_volumes_ml": volumes[1],
        "qa": qa,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(refiner.device),
        "torch_threads": torch.get_num_threads(),
        "config": refiner.cfg.model_dump(mode="json"),
    }
