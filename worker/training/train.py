"""`isl train`: fingerprint the dataset, train the segmentation network and the registration network,
and write a model bundle."""
from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from registration.model import Registrar, RegistrationConfig
from registration.train import train_registration
from segmentation.bundle import SegmentationModel
from segmentation.dataset import Dataset, load_case, load_dataset
from segmentation.errors import DatasetError
from segmentation.network import NetworkConfig
from segmentation.preprocess import ChannelNorm, Preprocessing
from segmentation.train import TrainConfig, train_network
from worker.method.bundle import ISLBundle, atlas_roi
from worker.training.card import dataset_metadata, write_model_card

log = logging.getLogger(__name__)


class BundleTrainConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    holdout: int = Field(0, ge=0, description="the first N cases in sorted order are never trained on (the test split)")
    cases: int | None = Field(None, ge=2, description="train on the first N cases after the holdout")
    atlas_pool: int = Field(40, ge=2, description="training cases kept as atlases (a seeded sample when more)")
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    name: str | None = None
    command: str | None = Field(None, description="the command line that trained it, for the model card")


def split(ds: Dataset, cfg: BundleTrainConfig) -> tuple[list[str], list[str]]:
    """(held-out ids, training ids), both in sorted order."""
    ids = sorted(c.case_id for c in ds.cases)
    held, rest = ids[: cfg.holdout], ids[cfg.holdout:]
    train = rest[: cfg.cases] if cfg.cases else rest
    if len(train) < 2:
        raise DatasetError(f"{ds.root}: {len(train)} training case(s) after holding out {cfg.holdout}; at least 2 are "
                           "needed")
    return held, train


def _ceil(n: float, multiple: int) -> int:
    return int(np.ceil(n / multiple) * multiple)


def fingerprint(ds: Dataset, volumes, labels) -> Preprocessing:
    """Preprocessing from the training data: median spacing, CT windows, an ROI that holds every label."""
    spacing = tuple(float(s) for s in np.median([v[0].geometry.spacing for v in volumes], axis=0))
    norms = []
    for c, name in enumerate(ds.channel_names):
        if name.strip().upper() == "CT":
            fg = np.concatenate([v[c].array[lab.array > 0].ravel() for v, lab in zip(volumes, labels)])
            lo, hi = np.percentile(fg, [0.5, 99.5])
            norms.append(ChannelNorm(scheme="window", low=float(lo), high=float(hi)))
        else:
            norms.append(ChannelNorm())
    pre = Preprocessing(spacing=spacing, channels=norms)
    extents = []
    for lab in labels:
        idx = np.argwhere(pre.label(lab) > 0)
        if len(idx):
            extents.append(idx.max(0) - idx.min(0) + 1)
    extent = np.max(extents, axis=0)
    roi = tuple(max(16, _ceil(e * 1.15 + 4, 8)) for e in extent)
    return pre.model_copy(update={"roi_size": roi, "patch_size": roi})


def _train_segmentation(ds: Dataset, pre: Preprocessing, images, labels, cfg: BundleTrainConfig, out_dir: Path,
                        device: torch.device, progress, resume: bool) -> tuple[SegmentationModel, list[float]]:
    """The initial network; kept as `segmentation.partial.pt` until the bundle is written (`--resume` reuses it)."""
    partial = out_dir / "segmentation.partial.pt"
    if resume and partial.is_file():
        progress(f"resuming: segmentation network from {partial}")
        return SegmentationModel.load(partial, device), []
    torch.manual_seed(cfg.training.seed)  # the initial weights too: torch's own seed differs in every process
    seg = SegmentationModel.create(cfg.network, pre, ds.labels)
    curve = train_network(seg.network, images, labels, pre.patch_size, cfg.training, device,
                          lambda it, loss: progress(f"segmentation iteration {it}/{cfg.training.iterations}: "
                                                    f"loss {loss:.4f}"))
    seg.save(partial)
    return seg, curve


def _train_registrar(images, labels, n_labels: int, pre: Preprocessing, cfg: BundleTrainConfig,
                     device: torch.device, progress) -> tuple[Registrar, list[float]]:
    """The registration network, on the ROIs of all training cases."""
    rois = [atlas_roi(x, y, pre.roi_size, n_labels) for x, y in zip(images, labels)]
    roi_imgs = torch.from_numpy(np.stack([r[0] for r in rois]))
    roi_onehot = torch.from_numpy(np.stack([r[1] for r in rois]))
    torch.manual_seed(cfg.registration.seed)
    reg = Registrar(cfg.registration)
    curve = train_registration(reg, roi_imgs[:, :1], roi_onehot[:, 1:], device,
                               lambda it, loss: progress(f"registration iteration {it}/{cfg.registration.iterations}: "
                                                         f"loss {loss:.4f}"))
    return reg, curve


def atlas_pool(train_ids: list[str], cfg: BundleTrainConfig) -> list[str]:
    """The training cases kept as atlases: all of them, or a seeded sample of `atlas_pool`."""
    if len(train_ids) <= cfg.atlas_pool:
        return sorted(train_ids)
    rng = np.random.default_rng(cfg.training.seed)
    return sorted(rng.choice(train_ids, cfg.atlas_pool, replace=False).tolist())


def train_bundle(dataset_dir: str | Path, out_dir: str | Path, cfg: BundleTrainConfig, device: torch.device,
                 progress=print, resume: bool = False) -> ISLBundle:
    t0 = time.perf_counter()
    ds = load_dataset(dataset_dir)
    held, train_ids = split(ds, cfg)
    progress(f"dataset {ds.name}: {len(ds.cases)} labelled cases; training on {len(train_ids)}, "
             f"holding out {len(held)}")
    loaded = [load_case(ds, ds.case(i)) for i in train_ids]
    volumes, labels = [v for v, _, _ in loaded], [lab for _, lab, _ in loaded]
    pre = fingerprint(ds, volumes, labels)
    progress(f"preprocessing: spacing {pre.spacing} mm, ROI/patch {pre.roi_size} voxels")
    images = [pre.images(v)[0] for v in volumes]
    label_arrays = [pre.label(lab) for lab in labels]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_seg = time.perf_counter()
    seg, curve = _train_segmentation(ds, pre, images, label_arrays, cfg, out_dir, device, progress, resume)
    t_seg = time.perf_counter() - t_seg
    t_reg = time.perf_counter()
    reg, reg_curve = _train_registrar(images, label_arrays, len(ds.labels), pre, cfg, device, progress)
    t_reg = time.perf_counter() - t_reg
    training = {"segmentation_seconds": round(t_seg, 1), "registration_seconds": round(t_reg, 1),
                "segmentation_final_loss": float(np.mean(curve[-100:])) if curve else None,
                "registration_final_loss": float(np.mean(reg_curve[-100:])),
                "total_seconds": round(time.perf_counter() - t0, 1), "device": str(device), "torch": torch.__version__}
    meta = _meta(ds, cfg, out_dir, held, train_ids, atlas_pool(train_ids, cfg),
                 [r.message() for _, _, r in loaded if r.remapped], training)
    bundle = ISLBundle(seg, reg.cpu(), meta, out_dir)
    bundle.save()
    (out_dir / "segmentation.partial.pt").unlink(missing_ok=True)
    write_model_card(bundle.path, bundle.meta, dataset_metadata(ds.root))
    progress(f"wrote {out_dir} ({bundle.version})")
    return bundle


def _meta(ds: Dataset, cfg: BundleTrainConfig, out_dir: Path, held, train_ids, pool, label_notes, training) -> dict:
    return {
        "name": cfg.name or Path(out_dir).name,
        "command": cfg.command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {"name": ds.name, "folder": ds.root.name, "labels": {str(k): v for k, v in ds.labels.items()},
                    "channels": ds.channel_names},
        "train_cases": train_ids,
        "holdout_cases": held,
        "atlases": pool,
        "label_notes": label_notes,
        "config": cfg.model_dump(mode="json"),
        "training": training,
    }
