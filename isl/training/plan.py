"""The plan of a training, read off the dataset before any network trains: which cases train, validate and are held
out; the preprocessing (median spacing, CT windows, an ROI that holds every label, the mirror axes); the members
of an ensemble; the atlas pool."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from imaging.dataset import Dataset
from imaging.errors import DatasetError
from segmentation.preprocess import ChannelNorm, Preprocessing

if TYPE_CHECKING:
    from isl.training.train import BundleTrainConfig


def validation_count(n_train: int, asked: int | None) -> int:
    """How many training cases to set aside for configuration: as asked, or a fifth (3 to 10) from 10 cases on."""
    if asked is not None:
        return asked
    return 0 if n_train < 10 else int(np.clip(round(n_train / 5), 3, 10))

def split(ds: Dataset, cfg: BundleTrainConfig) -> tuple[list[str], list[str], list[str]]:
    """(held-out ids, validation ids, training ids), each in sorted order. The held-out cases are the first
    `holdout` in sorted order (a test split the user can name); validation is a seeded sample of the rest."""
    ids = sorted(c.case_id for c in ds.cases)
    held, rest = ids[: cfg.holdout], ids[cfg.holdout:]
    rest = rest[: cfg.cases] if cfg.cases else rest
    n_val = validation_count(len(rest), cfg.validation)
    rng = np.random.default_rng(cfg.training.seed)
    val = sorted(rng.choice(rest, n_val, replace=False).tolist()) if n_val else []
    train = [c for c in rest if c not in val]
    if len(train) < 2:
        raise DatasetError(f"{ds.root}: {len(train)} training case(s) after holding out {cfg.holdout} and "
                           f"{n_val} for validation; at least 2 are needed")
    return held, val, train

def _ceil(n: float, multiple: int) -> int:
    return int(np.ceil(n / multiple) * multiple)

def mirror_axes(labels: list[np.ndarray], n_labels: int) -> tuple[int, ...]:
    """The spatial axes along which mirroring keeps a label map valid. An axis is left out when a label sits
    consistently on one side of the foreground's centre along it (median offset over the cases more than half the
    label's own extent): left and right parotid along left-right, brainstem above the spinal cord. A mirrored case
    would carry that label where the anatomy never has it, and mirror averaging would swap it with its partner."""
    allowed = []
    for axis in range(3):
        lateral = False
        for value in range(1, n_labels):
            offsets, extents = [], []
            for lab in labels:
                where = np.nonzero(lab == value)[axis]
                if len(where):
                    fg = np.nonzero(lab > 0)[axis]
                    offsets.append(where.mean() - (fg.min() + fg.max()) / 2)
                    extents.append(np.ptp(where) + 1)
            lateral |= bool(offsets) and abs(np.median(offsets)) > 0.5 * np.median(extents)
        if not lateral:
            allowed.append(axis)
    return tuple(allowed)

def fingerprint(ds: Dataset, volumes, labels) -> Preprocessing:
    """Preprocessing from the training data: median spacing, CT windows, an ROI that holds every label, the axes
    that mirroring may use."""
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
    axes = mirror_axes([pre.label(lab) for lab in labels], len(ds.labels))
    return pre.model_copy(update={"roi_size": roi, "patch_size": roi, "mirror_axes": axes})

def ensemble_plan(cfg: BundleTrainConfig, train_ids: list[str], channels: list[str]) -> dict | None:
    """What each member of an ensemble trains on: the training cases without its fold (`folds`), or every case on its
    own sequence (`per_sequence`); None for a single network."""
    if cfg.per_sequence:
        if len(channels) < 2:
            raise DatasetError(f"a per-sequence ensemble needs several sequences; the dataset has {channels}")
        return {"kind": "per_sequence", "members": len(channels), "combine": cfg.combine, "sequences": channels,
                "member_cases": [list(train_ids)] * len(channels)}
    if cfg.folds == 1:
        return None
    folds = np.array_split(np.random.default_rng(cfg.training.seed).permutation(len(train_ids)), cfg.folds)
    if min(len(f) for f in folds) < 1 or len(train_ids) - max(len(f) for f in folds) < 2:
        raise DatasetError(f"{cfg.folds} folds of {len(train_ids)} training cases leave a member fewer than 2 cases")
    member_cases = [[c for i, c in enumerate(train_ids) if i not in held] for held in (set(f.tolist()) for f in folds)]
    return {"kind": "folds", "members": cfg.folds, "combine": cfg.combine, "member_cases": member_cases}

def atlas_pool(train_ids: list[str], cfg: BundleTrainConfig) -> list[str]:
    """The training cases kept as atlases: all of them, or a seeded sample of `atlas_pool`."""
    if len(train_ids) <= cfg.atlas_pool:
        return sorted(train_ids)
    rng = np.random.default_rng(cfg.training.seed)
    return sorted(rng.choice(train_ids, cfg.atlas_pool, replace=False).tolist())
