"""A model bundle: one folder holding the segmentation checkpoint, the registration checkpoint,
`bundle.json` (labels, atlas case ids, training facts, metrics) and a model card."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imaging.codes import check_overrides
from imaging.dataset import load_case, load_dataset
from imaging.errors import BundleError, DatasetError
from imaging.files import atomic_write_text
from isl.meta import BundleMeta
from registration.model import Registrar
from segmentation.bundle import SegmentationModel
from segmentation.preprocess import centroid, crop

log = logging.getLogger(__name__)
NESTED = ("registration", "affine")  # ISLConfig's fields that are configs of their own
SEG_FILE, REG_FILE, META_FILE, CARD_FILE = "model.pt", "registration.pt", "bundle.json", "MODEL_CARD.md"


CONTEXT = 1.5  # an atlas's context crop spans this many times the ROI along each axis: what a global transform samples


def context_size(roi_size) -> tuple[int, ...]:
    """The context crop's size: about CONTEXT times the ROI, with each axis's parity kept so that both crops share
    their centre voxel for voxel."""
    return tuple(n + 2 * math.ceil(n * (CONTEXT - 1) / 2) for n in roi_size)


def atlas_context(image: np.ndarray, label: np.ndarray, roi_size) -> tuple[np.ndarray, np.ndarray]:
    """A labelled case (C, z, y, x) + (z, y, x) cropped around its label's centre, as `atlas_roi` is, to the larger
    context_size(roi_size): image and label map (uint8)."""
    center, size = centroid(label > 0), context_size(roi_size)
    return crop(image, center, size), crop(label, center, size).astype(np.uint8)


def atlas_roi(image: np.ndarray, label: np.ndarray, roi_size, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop a labelled case (C, z, y, x) + (z, y, x) to the ROI centred on its label: image and one-hot (L, ...)."""
    center = centroid(label > 0)
    onehot = np.eye(n_labels, dtype=np.float32)[crop(label, center, roi_size).astype(np.int64)]
    return crop(image, center, roi_size), np.ascontiguousarray(onehot.transpose(3, 0, 1, 2))


@dataclass
class Atlases:
    """Labelled training cases cropped to the ROI around their label: images (N, C, ...), one-hot (N, L, ...),
    and which labels each contours (N, L) bool (partial labels: see imaging.dataset); and, for a global transform to
    sample from, the same cases on a larger crop around the same centre (`atlas_context`): images (N, C, ...) and
    label maps (N, ...) uint8, or None."""

    case_ids: list[str]
    images: torch.Tensor
    onehot: torch.Tensor
    known: torch.Tensor | None = None
    context_images: torch.Tensor | None = None
    context_labels: torch.Tensor | None = None

    def __post_init__(self):
        if self.known is None:
            self.known = torch.ones(self.onehot.shape[:2], dtype=torch.bool)

    def plus(self, other: Atlases) -> Atlases:
        """These atlases followed by `other`'s (with context crops where both have them)."""
        both = self.context_images is not None and other.context_images is not None
        return Atlases(self.case_ids + other.case_ids, torch.cat([self.images, other.images.to(self.images)]),
                       torch.cat([self.onehot, other.onehot.to(self.onehot)]),
                       torch.cat([self.known, other.known.to(self.known.device)]),
                       torch.cat([self.context_images, other.context_images.to(self.context_images)]) if both else None,
                       torch.cat([self.context_labels, other.context_labels.to(self.context_labels)]) if both else None)


@dataclass
class ISLBundle:
    segmentation: SegmentationModel
    registrar: Registrar
    meta: dict
    path: Path

    @property
    def info(self) -> BundleMeta:
        """`meta` (what bundle.json holds) read through named fields."""
        return BundleMeta.model_validate(self.meta)

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def atlas_ids(self) -> list[str]:
        return list(self.info.atlases)

    def refinement_config(self, overrides: dict | None = None):
        """The ISLConfig that `isl train` configured for this bundle (the defaults for a bundle never
        configured), with `overrides` (field -> value) on top, validated."""
        from isl.config import ISLConfig

        refinement = self.info.refinement
        data = dict(refinement.config if refinement else {})
        for name, value in (overrides or {}).items():  # a nested config (registration, affine): field by field
            nested = isinstance(value, dict) and isinstance(data.get(name), dict) and name in NESTED
            data[name] = data[name] | value if nested else value
        return ISLConfig.model_validate(data)

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        """bundle.json of the bundle at `path`, without loading its networks; BundleError when there is none."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise BundleError(f"{path}: not a model bundle (no {META_FILE})")
        return json.loads((path / META_FILE).read_text())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> ISLBundle:
        path = Path(path)
        meta = cls.read_meta(path)
        seg = SegmentationModel.load(path / SEG_FILE, device)
        reg = Registrar.load(path / REG_FILE, device)
        try:  # a bad code map fails here, not at export after a scan was refined
            check_overrides((meta.get("dataset") or {}).get("segment_codes"), seg.labels, str(path / META_FILE))
        except DatasetError as exc:
            raise BundleError(str(exc)) from None
        return cls(seg, reg, meta, path)

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.segmentation.save(self.path / SEG_FILE)
        self.registrar.save(self.path / REG_FILE)
        digest = hashlib.sha256()  # one digest of both checkpoints and the refinement configuration: the version
        for name in (SEG_FILE, REG_FILE):  # names what the bundle does
            digest.update((self.path / name).read_bytes())
        if self.meta.get("refinement"):
            digest.update(json.dumps(self.meta["refinement"]["config"], sort_keys=True).encode())
        self.meta["version"] = f"{self.meta.get('name', self.path.name)}-{digest.hexdigest()[:12]}"
        atomic_write_text(self.path / META_FILE, json.dumps(self.meta, indent=2) + "\n")

    def case_atlas(self, case_id: str, volumes: list, label) -> Atlases:
        """One labelled case (its channels' Volumes and its label map Volume on their grid) as an atlas, cropped
        as the bundle's own atlases are; every label counts as contoured. A radiologist's correction joins the
        atlas bank this way."""
        pre = self.segmentation.preprocessing
        values = np.unique(label.array)
        if values.max(initial=0) >= len(self.segmentation.labels):
            raise DatasetError(f"{case_id}: label values {values.tolist()} do not fit model {self.version}'s "
                               f"labels {self.segmentation.labels}")
        image, label = pre.images(volumes)[0], pre.label(label)
        img, onehot = atlas_roi(image, label, pre.roi_size, len(self.segmentation.labels))
        ctx_img, ctx_lab = atlas_context(image, label, pre.roi_size)
        return Atlases([case_id], torch.from_numpy(img[None]), torch.from_numpy(onehot[None]), None,
                       torch.from_numpy(ctx_img[None]), torch.from_numpy(ctx_lab[None]))

    def load_atlases(self, atlas_dir: str | Path | None, context: bool = False) -> Atlases:
        """Read this bundle's atlas cases by id from a dataset folder and crop each around its label; with
        `context`, also on the larger crop a global transform samples (3.4 times the memory: only where the
        configuration has a global stage)."""
        if atlas_dir is None:
            raise DatasetError(f"model {self.version} refines with atlases {self.atlas_ids[:3]}...: give --atlas-dir, "
                               f"the dataset folder that holds them")
        atlas_dir = Path(atlas_dir)
        if not atlas_dir.is_dir():
            raise DatasetError(f"atlas folder {atlas_dir} does not exist (model {self.version} needs its atlas cases)")
        ds = load_dataset(atlas_dir)
        pre = self.segmentation.preprocessing
        n_labels = len(self.segmentation.labels)
        images, onehots, known, ctx_images, ctx_labels = [], [], [], [], []
        for case_id in self.atlas_ids:
            case = ds.case(case_id)
            vols, label, _ = load_case(ds, case)
            image, label = pre.images(vols)[0], pre.label(label)
            img, onehot = atlas_roi(image, label, pre.roi_size, n_labels)
            images.append(img)
            onehots.append(onehot)
            known.append(case.present(self.segmentation.labels))
            if context:
                for out, part in zip((ctx_images, ctx_labels), atlas_context(image, label, pre.roi_size)):
                    out.append(part)
        stack = lambda parts: torch.from_numpy(np.stack(parts)) if parts else None  # noqa: E731
        return Atlases(self.atlas_ids, stack(images), stack(onehots), stack(known), stack(ctx_images),
                       stack(ctx_labels))
