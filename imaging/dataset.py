"""Datasets in the Medical Segmentation Decathlon / nnU-Net raw layout.

    DATASET/dataset.json        labels, channel (modality) names, file ending
    DATASET/imagesTr/ID.nii.gz  or ID_0000.nii.gz, ID_0001.nii.gz ... for several sequences per case
    DATASET/labelsTr/ID.nii.gz
    DATASET/imagesTs/...        unlabelled
    DATASET/cases.json          optional: which structures each case's label map contours (partial labels)

Partial labels: a structure that was not contoured in a case is unknown there, not background (a planning CT
whose plan did not need the larynx still has one). `cases.json` is a list of {"case": ID,
"structures_present": [label names]}; a case it lists carries exactly those structures, a case it does not
list carries all of them. Training merges an unknown structure into background in the loss (marginal loss),
atlases do not vote on it and evaluation does not score it.

Coded segments: dataset.json may carry `"segment_codes"` (label name -> SNOMED CT category, type, laterality,
colour; see imaging.codes), which `isl train` keeps in the bundle for DICOM exports.

Both dataset.json dialects are read: MSD (`"labels": {"0": "background"}`, `"modality"`) and nnU-Net v2
(`"labels": {"background": 0}`, `"channel_names"`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from imaging.codes import check_overrides
from imaging.errors import DatasetError
from imaging.io import LabelReport, Volume, read_image, read_label_map
from imaging.sequences import on_first_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    annotated: tuple[int, ...] | None = None  # foreground labels contoured in this case; None: all

    def present(self, labels: dict[int, str]) -> np.ndarray:
        """(L,) bool over `labels` (background included, always known): which labels this case annotates."""
        return np.array([v == 0 or self.annotated is None or v in self.annotated for v in labels])


@dataclass
class Dataset:
    root: Path
    name: str
    labels: dict[int, str]  # value -> name, background included
    channel_names: list[str]
    file_ending: str
    cases: list[Case] = field(default_factory=list)
    segment_codes: dict[str, dict] = field(default_factory=dict)  # label name -> code spec (imaging.codes)

    @property
    def foreground(self) -> dict[int, str]:
        return {v: n for v, n in self.labels.items() if v != 0}

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise DatasetError(f"{self.root}: no labelled case {case_id!r} (it has {len(self.cases)} cases)")


def _parse_labels(meta: dict, where: Path) -> dict[int, str]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: 'labels' must be a non-empty mapping")
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw):  # MSD: {"0": "background"}
            labels = {int(k): str(v) for k, v in raw.items()}
        else:  # nnU-Net v2: {"background": 0}
            labels = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: 'labels' values must be integers ({exc}); region-based labels are not "
                           "supported") from exc
    if 0 not in labels:
        raise DatasetError(f"{where}: 'labels' has no background (0)")
    if "ignore" in labels.values():
        raise DatasetError(f"{where}: an 'ignore' label (nnU-Net's voxel-wise partial labels) is not supported; "
                           "list the structures each case contours in cases.json instead")
    return dict(sorted(labels.items()))


def _channel_names(meta: dict) -> list[str]:
    raw = meta.get("channel_names") or meta.get("modality") or {"0": "image"}
    return [str(raw[k]) for k in sorted(raw, key=int)]


def _case_images(images_dir: Path, case_id: str, n_channels: int, ending: str) -> tuple[Path, ...]:
    suffixed = tuple(images_dir / f"{case_id}_{c:04d}{ending}" for c in range(n_channels))
    if all(p.exists() for p in suffixed):
        return suffixed
    plain = images_dir / f"{case_id}{ending}"
    if n_channels == 1 and plain.exists():
        return (plain,)
    missing = [p.name for p in suffixed if not p.exists()]
    raise DatasetError(f"{images_dir}: case {case_id} lacks image files {missing}")


def load_dataset(root: str | Path) -> Dataset:
    """Index a dataset folder; nothing is decoded until `load_case`."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no dataset.json (expected the MSD / nnU-Net raw layout)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: invalid JSON ({exc})") from exc
    ending = meta.get("file_ending", ".nii.gz")
    labels = _parse_labels(meta, meta_path)
    ds = Dataset(root, meta.get("name", root.name), labels, _channel_names(meta), ending,
                 segment_codes=check_overrides(meta.get("segment_codes"), labels, str(meta_path)))
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError(f"{root}: no labelsTr/ folder")
    for label_path in sorted(labels_dir.glob(f"*{ending}")):
        case_id = label_path.name[: -len(ending)]
        images = _case_images(root / "imagesTr", case_id, len(ds.channel_names), ending)
        ds.cases.append(Case(case_id, images, label_path))
    if not ds.cases:
        raise DatasetError(f"{labels_dir}: no label files ending in {ending}")
    annotated = _annotations(root / "cases.json", ds)
    ds.cases = [replace(c, annotated=annotated.get(c.case_id)) for c in ds.cases]
    return ds


def _annotations(path: Path, ds: Dataset) -> dict[str, tuple[int, ...]]:
    """Case id -> the label values it contours, from `cases.json` (absent file: every case contours all)."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON ({exc})") from exc
    by_name = {n: v for v, n in ds.foreground.items()}
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a list of {{'case': ID, 'structures_present': [names]}}")
    out = {}
    for entry in entries:
        if not isinstance(entry, dict) or "case" not in entry or "structures_present" not in entry:
            raise DatasetError(f"{path}: every entry needs 'case' and 'structures_present' ({str(entry)[:80]})")
        unknown = [n for n in entry["structures_present"] if n not in by_name]
        if unknown:
            raise DatasetError(f"{path}: case {entry['case']} lists structures {unknown} that dataset.json's labels "
                               f"do not name ({sorted(by_name)})")
        out[str(entry["case"])] = tuple(sorted(by_name[n] for n in entry["structures_present"]))
    return out


def load_images(paths: tuple[Path, ...] | list[Path], names: list[str] | None = None) -> list[Volume]:
    """Read the sequences (channels) of one case, each on the first one's grid: a sequence on another grid is
    rigidly co-registered to the first (imaging.sequences)."""
    return on_first_grid([read_image(p) for p in paths], names)[0]


def load_case(ds: Dataset, case: Case) -> tuple[list[Volume], Volume, LabelReport]:
    """Images (one Volume per channel) and the checked label map of a labelled case."""
    images = load_images(case.image_paths, ds.channel_names)
    label, report = read_label_map(case.label_path, ds.labels)
    images[0].geometry.check_same(label.geometry, f"label {case.label_path.name} vs image")
    if case.annotated is not None:
        stray = sorted(set(np.unique(label.array).tolist()) - {0, *case.annotated})
        if stray:
            raise DatasetError(f"{case.label_path}: holds labels {[ds.labels.get(v, v) for v in stray]} that "
                               f"cases.json says case {case.case_id} does not contour")
    if report.remapped:
        log.warning(report.message())
    return images, label, report
