"""Datasets in the Medical Segmentation Decathlon / nnU-Net raw layout.

    DATASET/dataset.json        labels, channel (modality) names, file ending
    DATASET/imagesTr/ID.nii.gz  or ID_0000.nii.gz, ID_0001.nii.gz ... for several sequences per case
    DATASET/labelsTr/ID.nii.gz
    DATASET/imagesTs/...        unlabelled

Both dataset.json dialects are read: MSD (`"labels": {"0": "background"}`, `"modality"`) and nnU-Net v2
(`"labels": {"background": 0}`, `"channel_names"`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from segmentation.errors import DatasetError
from segmentation.io import LabelReport, Volume, read_image, read_label_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None


@dataclass
class Dataset:
    root: Path
    name: str
    labels: dict[int, str]  # value -> name, background included
    channel_names: list[str]
    file_ending: str
    cases: list[Case] = field(default_factory=list)

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
    ds = Dataset(root, meta.get("name", root.name), _parse_labels(meta, meta_path), _channel_names(meta), ending)
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError(f"{root}: no labelsTr/ folder")
    for label_path in sorted(labels_dir.glob(f"*{ending}")):
        case_id = label_path.name[: -len(ending)]
        images = _case_images(root / "imagesTr", case_id, len(ds.channel_names), ending)
        ds.cases.append(Case(case_id, images, label_path))
    if not ds.cases:
        raise DatasetError(f"{labels_dir}: no label files ending in {ending}")
    return ds


def load_images(paths: tuple[Path, ...] | list[Path]) -> list[Volume]:
    """Read the channels of one case and check that they share one grid."""
    volumes = [read_image(p) for p in paths]
    for other in volumes[1:]:
        volumes[0].geometry.check_same(other.geometry, f"channel {Path(other.source).name} vs "
                                                       f"{Path(volumes[0].source).name}")
    return volumes


def load_case(ds: Dataset, case: Case) -> tuple[list[Volume], Volume, LabelReport]:
    """Images (one Volume per channel) and the checked label map of a labelled case."""
    images = load_images(case.image_paths)
    label, report = read_label_map(case.label_path, ds.labels)
    images[0].geometry.check_same(label.geometry, f"label {case.label_path.name} vs image")
    if report.remapped:
        log.warning(report.message())
    return images, label, report
