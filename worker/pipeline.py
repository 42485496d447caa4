"""The Python API behind `isl refine` and the Celery task: read, refine, write, report."""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from segmentation.io import Volume, read_image, write_label_map
from service.storage import Storage
from segmentation.preprocess import to_native
from worker.bundle import ISLBundle
from worker.config import ISLConfig
from worker.engine import Refiner, pick_device


def load_refiner(model_dir: str | Path, atlas_dir: str | Path | None, cfg: ISLConfig | None = None,
                 device: str = "auto") -> Refiner:
    """Load a bundle and its atlases once; the Refiner then serves any number of scans."""
    cfg = cfg or ISLConfig(device=device)
    dev = pick_device(device)
    bundle = ISLBundle.load(model_dir, dev)
    return Refiner(bundle, bundle.load_atlases(atlas_dir), cfg, dev)


def label_volumes_ml(labels: np.ndarray, spacing, names: dict[int, str]) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {names[v]: round(float(np.count_nonzero(labels == v)) * voxel_ml, 3) for v in names if v != 0}


def refine_volumes(refiner: Refiner, volumes: list[Volume], progress=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Refined and baseline label maps on the first volume's native grid, plus QA and stage timings."""
    pre = refiner.pre
    t0 = time.perf_counter()
    image, canonical = pre.images(volumes)
    t_pre = time.perf_counter() - t0
    result = refiner.refine(image, progress)
    t0 = time.perf_counter()
    native = volumes[0].geometry
    refined, baseline = to_native(result.probs, canonical, native), to_native(result.baseline, canonical, native)
    seconds = {"preprocess": t_pre, **result.seconds, "to_native": time.perf_counter() - t0}
    return refined, baseline, {"qa": result.qa, "seconds": seconds}


def refine_file(inputs: str | Path | list, model_dir: str | Path, out_dir: str | Path, *, atlas_dir=None,
                atlases: int | None = None, device: str = "auto", series_uid: str | None = None,
                refiner: Refiner | None = None, progress=None) -> dict:
    """Refine one scan given as a file/folder per channel; writes mask.nii.gz (and seg.dcm for DICOM
    input), baseline.nii.gz and report.json into `out_dir`, and returns the report."""
    t_start = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    t0 = time.perf_counter()
    volumes = [read_image(p, series_uid=series_uid) for p in inputs]
    for v in volumes[1:]:
        volumes[0].geometry.check_same(v.geometry, f"channel {v.source} vs {volumes[0].source}")
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    if refiner is None:
        cfg = ISLConfig(device=device)
        if atlases is not None:
            cfg.atlases = atlases
        refiner = load_refiner(model_dir, atlas_dir, cfg, device)
    t_load = time.perf_counter() - t0
    refined, baseline, info = refine_volumes(refiner, volumes, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    outputs = {"mask": write_label_map(refined, volumes[0].geometry, out / "mask.nii.gz"),
               "baseline": write_label_map(baseline, volumes[0].geometry, out / "baseline.nii.gz")}
    names = refiner.bundle.segmentation.labels
    if volumes[0].kind == "dicom":
        from segmentation.dicomseg import write_dicom_seg

        outputs["dicom_seg"] = write_dicom_seg(refined, volumes[0], names, out / "seg.dcm", software_version=refiner.bundle.version)
    t_write = time.perf_counter() - t0
    spacing = volumes[0].geometry.spacing
    report = {
        "input": [str(p) for p in inputs],
        "output": str(outputs["mask"]),
        "files": {k: {"path": p.name, "sha256": Storage.sha256(p)} for k, p in outputs.items()},
        "model_version": refiner.bundle.version,
        "labels": {str(k): v for k, v in names.items()},
        "volumes_ml": label_volumes_ml(refined, spacing, names),
        "baseline_volumes_ml": label_volumes_ml(baseline, spacing, names),
        "qa": info["qa"],
        "seconds": {k: round(v, 3) for k, v in {"read": t_read, "load_model": t_load, **info["seconds"],
                                                "write": t_write, "total": time.perf_counter() - t_start}.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(refiner.device),
        "torch_threads": torch.get_num_threads(),
        "config": refiner.cfg.model_dump(mode="json"),
    }
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    return report

