"""`isl train`: fingerprint the dataset, train the segmentation network and the registration network,
and write a model bundle."""
from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imaging.dataset import Dataset, load_case, load_dataset
from imaging.errors import BundleError, DatasetError
from isl.bundle import ISLBundle, atlas_roi
from isl.training.card import dataset_metadata, write_model_card
from isl.training.plan import atlas_pool, ensemble_plan, fingerprint, split
from registration.model import Registrar, RegistrationConfig
from registration.train import train_registration
from segmentation.bundle import SegmentationModel
from segmentation.network import NetworkConfig, build_network
from segmentation.preprocess import Preprocessing
from segmentation.train import TrainConfig, train_network
from segmentation.transfer import HEAD, copy_fitting, encoder_parameters, single_state

SCORES_FILE = "configuration_scores.json"  # every candidate's per-label validation Dice (configure.save_scores)

log = logging.getLogger(__name__)


class BundleTrainConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    holdout: int = Field(0, ge=0, description="the first N cases in sorted order are never trained on (the test split)")
    cases: int | None = Field(None, ge=2, description="train on the first N cases after the holdout")
    validation: int | None = Field(None, ge=0, description="cases held out of the training cases (a seeded sample) "
                                                           "to configure refinement on; None: a fifth of them, 3 to "
                                                           "10, and none under 10 training cases")
    atlas_pool: int = Field(40, ge=2, description="training cases kept as atlases (a seeded sample when more)")
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    configure: bool = Field(True, description="search the refinement settings on the validation cases after training")
    configure_minutes: float = Field(30.0, gt=0, description="time budget of that search (whole validation cases "
                                                             "are processed until it is spent; at least 2)")
    init_from: str | None = Field(None, description="a bundle folder whose networks start this training (transfer "
                                                    "learning): whatever its organ, modality or labels, the layers "
                                                    "that fit are copied and the output layer is new")
    freeze_encoder: int = Field(0, ge=0, description="with init_from: hold the transferred encoder still for the first "
                                                     "N iterations while the new output layer settles")
    folds: int = Field(1, ge=1, description="an ensemble of K networks, each trained without one fold of the training "
                                            "cases (k-fold), combined as one model")
    per_sequence: bool = Field(False, description="an ensemble of one network per sequence, each trained on its own "
                                                  "sequence, combined as one model")
    combine: Literal["mean", "vote"] = Field("mean", description="how an ensemble combines its members: probability "
                                                                 "averaging or majority vote")
    name: str | None = None
    command: str | None = Field(None, description="the command line that trained it, for the model card")

    @model_validator(mode="after")
    def _consistent(self):
        if self.freeze_encoder and not self.init_from:
            raise ValueError("freezing the encoder needs a transferred one (init_from)")
        if self.folds > 1 and self.per_sequence:
            raise ValueError("an ensemble is of folds or of sequences, not both")
        if self.combine != "mean" and self.folds == 1 and not self.per_sequence:
            raise ValueError("combine describes an ensemble: give folds > 1 or per_sequence")
        return self


def _train_segmentation(ds: Dataset, pre: Preprocessing, images, labels, known: np.ndarray, cfg: BundleTrainConfig,
                        out_dir: Path, device: torch.device, progress, resume: bool,
                        source: ISLBundle | None = None, plan: dict | None = None,
                        train_ids: list[str] | None = None) -> tuple[SegmentationModel, list[float], list[float]]:
    """The initial network, from seeded random weights or, transferred, from `source`'s where they fit; for an
    ensemble (`plan`), each member on its own cases or sequence, with its own seed. Kept as
    `segmentation.partial.pt` until the bundle is written (`--resume` reuses it). Returns the model, the last 100
    losses of each member and the loss curve (the members' mean per iteration; empty when resumed)."""
    partial = out_dir / "segmentation.partial.pt"
    if resume and partial.is_file():
        progress(f"resuming: segmentation network from {partial}")
        return SegmentationModel.load(partial, device), [], []
    torch.manual_seed(cfg.training.seed)  # the initial weights too: torch's own seed differs in every process
    seg = SegmentationModel.create(cfg.network, pre, ds.labels)
    members = list(seg.network.members) if plan else [seg.network]
    index = {c: i for i, c in enumerate(train_ids or [])}
    tail, curves = [], []
    for k, net in enumerate(members):
        cases = [index[c] for c in plan["member_cases"][k]] if plan else list(range(len(images)))
        channel = slice(k, k + 1) if plan and plan["kind"] == "per_sequence" else slice(None)
        frozen = ([], 0)
        if source is not None:
            copy_fitting(net, single_state(source.segmentation.network), (HEAD,))
            frozen = (encoder_parameters(net), cfg.freeze_encoder)
        what = f"member {k + 1}/{len(members)} " if plan else ""
        curve = train_network(net, [images[i][channel] for i in cases], [labels[i] for i in cases], pre.patch_size,
                              cfg.training.model_copy(update={"seed": cfg.training.seed + k}), device,
                              lambda it, loss, what=what: progress(f"segmentation {what}iteration {it}/"
                                                        f"{cfg.training.iterations}: loss {loss:.4f}"),
                              annotated=known[cases], mirror_axes=pre.mirror_axes, frozen=frozen)
        tail += curve[-100:]
        curves.append(curve)
    seg.save(partial)
    return seg, tail, np.mean([c[:min(map(len, curves))] for c in curves], axis=0).tolist()


def _train_registrar(images, labels, known: np.ndarray, pre: Preprocessing, cfg: BundleTrainConfig,
                     device: torch.device, progress, start: Registrar | None = None) -> tuple[Registrar, list[float]]:
    """The registration network, on the ROIs of all training cases; trained further from `start` when given (a
    retraining's warm start), else from seeded random weights."""
    rois = [atlas_roi(x, y, pre.roi_size, known.shape[1]) for x, y in zip(images, labels)]
    roi_imgs = torch.from_numpy(np.stack([r[0] for r in rois]))
    roi_onehot = torch.from_numpy(np.stack([r[1] for r in rois]))
    torch.manual_seed(cfg.registration.seed)
    reg = Registrar(cfg.registration) if start is None else start
    reg.cfg = cfg.registration if start is None else start.cfg.model_copy(
        update={"iterations": cfg.registration.iterations})
    curve = train_registration(reg, roi_imgs[:, :1], roi_onehot[:, 1:], device,
                               lambda it, loss: progress(f"registration iteration {it}/{cfg.registration.iterations}: "
                                                         f"loss {loss:.4f}"),
                               known=torch.from_numpy(known[:, 1:]))
    return reg, curve


def curve_points(curve, points: int = 60) -> list[list[float]]:
    """A training loss curve kept in the bundle (the console draws it): the per-iteration losses averaged over at
    most `points` equal windows, as [last iteration of the window, mean loss] pairs."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size == 0:
        return []
    edges = np.unique(np.linspace(0, curve.size, min(points, curve.size) + 1).round().astype(int))
    return [[int(b), round(float(curve[a:b].mean()), 5)] for a, b in zip(edges[:-1], edges[1:])]


def train_bundle(dataset_dir: str | Path, out_dir: str | Path, cfg: BundleTrainConfig, device: torch.device,
                 progress=print, resume: bool = False) -> ISLBundle:
    t0 = time.perf_counter()
    ds = load_dataset(dataset_dir)
    source, cfg, transfer = transfer_source(cfg, ds, progress)
    held, val_ids, train_ids = split(ds, cfg)
    plan = ensemble_plan(cfg, train_ids, ds.channel_names)
    if plan:
        cfg = cfg.model_copy(update={"network": cfg.network.model_copy(update={
            "members": plan["members"], "combine": plan["combine"],
            "member_inputs": "one_each" if plan["kind"] == "per_sequence" else "all"})})
    progress(f"dataset {ds.name}: {len(ds.cases)} labelled cases; training on {len(train_ids)}, "
             f"{len(val_ids)} for validation, holding out {len(held)}")
    loaded = [load_case(ds, ds.case(i)) for i in train_ids]
    volumes, labels = [v for v, _, _ in loaded], [lab for _, lab, _ in loaded]
    pre = fingerprint(ds, volumes, labels)
    progress(f"preprocessing: spacing {pre.spacing} mm, ROI/patch {pre.roi_size} voxels, mirror axes (z, y, x) "
             f"{pre.mirror_axes}")
    images = [pre.images(v)[0] for v in volumes]
    label_arrays = [pre.label(lab) for lab in labels]
    known = np.stack([ds.case(i).present(ds.labels) for i in train_ids])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_seg = time.perf_counter()
    seg, curve, full_curve = _train_segmentation(ds, pre, images, label_arrays, known, cfg, out_dir, device,
                                                 progress, resume, source, plan, train_ids)
    t_seg = time.perf_counter() - t_seg
    t_reg = time.perf_counter()
    reg, reg_curve = _train_registrar(images, label_arrays, known, pre, cfg, device, progress,
                                      _transferred_registrar(cfg, source, transfer))
    t_reg = time.perf_counter() - t_reg
    training = {"segmentation_seconds": round(t_seg, 1), "registration_seconds": round(t_reg, 1),
                "segmentation_final_loss": float(np.mean(curve[-100:])) if curve else None,
                "registration_final_loss": float(np.mean(reg_curve[-100:])),
                "curves": {"segmentation": curve_points(full_curve), "registration": curve_points(reg_curve)},
                "total_seconds": round(time.perf_counter() - t0, 1), "device": str(device), "torch": torch.__version__}
    meta = _meta(ds, cfg, out_dir, held, val_ids, train_ids, atlas_pool(train_ids, cfg),
                 [r.message() for _, _, r in loaded if r.remapped], training)
    if transfer:
        meta["transfer"] = transfer
    if plan:
        meta["ensemble"] = plan
    bundle = ISLBundle(seg, reg.cpu(), meta, out_dir)
    bundle.save()
    (out_dir / "segmentation.partial.pt").unlink(missing_ok=True)
    _configure_after_training(bundle, ds, cfg, val_ids, len(train_ids), device, progress)
    write_model_card(bundle.path, bundle.meta, dataset_metadata(ds.root))
    progress(f"wrote {out_dir} ({bundle.version})")
    return bundle


def _transferred_registrar(cfg: BundleTrainConfig, source: ISLBundle | None, transfer: dict) -> Registrar | None:
    """With a transfer source, the registration network to start from: the source's layers that fit (recorded in
    `transfer`); else None (random weights)."""
    if source is None:
        return None
    torch.manual_seed(cfg.registration.seed)
    start = Registrar(cfg.registration)
    transfer["registration"] = copy_fitting(start.net, source.registrar.net.state_dict()).summary()
    return start


def _configure_after_training(bundle: ISLBundle, ds: Dataset, cfg: BundleTrainConfig, val_ids: list[str],
                              n_train: int, device: torch.device, progress) -> None:
    """Search the refinement settings on the validation cases, or record why refinement runs unconfigured."""
    if val_ids and cfg.configure:
        configure_bundle(bundle, ds, val_ids, cfg.configure_minutes * 60, device, progress)
    elif cfg.configure and cfg.validation is None:  # too few cases to set any aside: nothing to decide ISL from
        bundle.meta["refinement"] = unconfigured_record(n_train, bundle.refinement_config())
        bundle.save()
        progress(f"configuration: {bundle.meta['refinement']['decision']['reason']}")
    elif val_ids or cfg.configure:
        progress("configuration skipped (" + ("--no-configure" if val_ids else "--validation 0") + "): refinement "
                 "runs ISL with the ISLConfig defaults, unchecked on this data")


def transfer_source(cfg: BundleTrainConfig, ds: Dataset, progress) -> tuple[ISLBundle | None, BundleTrainConfig, dict]:
    """For a training that starts from another bundle (`init_from`): that bundle, the config with its network
    architectures (the weights can only be copied into the same layers), and the transfer record of the new
    bundle's lineage (oldest first; the source's own lineage, then the source)."""
    if not cfg.init_from:
        return None, cfg, {}
    source = ISLBundle.load(cfg.init_from)
    src = source.meta
    arch = {k: getattr(source.registrar.cfg, k) for k in ("nb_features", "integration_steps", "downsample",
                                                            "ncc_window")}
    cfg = cfg.model_copy(update={"network": source.segmentation.config.member(),
                                 "registration": cfg.registration.model_copy(update=arch)})
    ancestor = {"name": src["name"], "version": src["version"], "dataset": src["dataset"]["name"],
                "channels": src["dataset"]["channels"],
                "labels": [v for k, v in src["dataset"]["labels"].items() if k != "0"]}
    probe = build_network(cfg.network, 1 if cfg.per_sequence else len(ds.channel_names), len(ds.labels))
    copied = copy_fitting(probe, single_state(source.segmentation.network), (HEAD,)).summary()  # as training copies
    record = {"from": str(cfg.init_from), **ancestor, "segmentation": copied,
              "freeze_encoder_steps": cfg.freeze_encoder, "lr": cfg.training.lr,
              "lineage": list((src.get("transfer") or {}).get("lineage", [])) + [ancestor]}
    progress(f"transfer: starting from {src['name']} ({src['version']}, {ancestor['dataset']}: "
             f"{', '.join(ancestor['channels'])}; {', '.join(ancestor['labels'])})")
    return source, cfg, record


def unconfigured_record(n_train: int, base) -> dict:
    """The `refinement` record of a bundle trained on too few cases to set validation cases aside: with nothing to
    decide from whether ISL helps on this data (defaults tuned on one dataset hurt on another), refinement returns
    the network's own mask, and the record says why and how that changes."""
    reason = (f"{n_train} training cases, too few to set aside the validation cases (at 10 training cases or more) "
              "on which the configuration decides whether and how ISL helps on this data; refinement returns the "
              "network's own mask (baseline) until the model is configured: by `isl configure` on labelled cases it "
              "has not trained on, or by a retraining with radiologists' corrections, which holds some back for it")
    return {"config": base.model_copy(update={"method": "baseline"}).model_dump(mode="json", exclude={"device"}),
            "decision": {"method": "baseline", "reason": reason, "configured": False},
            "validation_cases": [], "table": [], "per_label": {}, "seconds": 0.0, "budget_seconds": 0.0}


def configure_bundle(bundle: ISLBundle, ds: Dataset, case_ids: list[str], budget_s: float, device: torch.device,
                     progress=print, atlas_dir=None) -> dict:
    """Search the refinement settings on `case_ids` of `ds` (see isl/training/configure.py) and write the result
    into the bundle (a new version: the configuration is part of what the bundle does). The atlases are read from
    `atlas_dir` (default: `ds`)."""
    from isl.refiner import Refiner
    from isl.training.configure import configure

    refiner = Refiner(bundle, bundle.load_atlases(atlas_dir or ds.root, context=True),  # the global stage's choice
                      bundle.refinement_config({"device": device.type}), device)
    record = configure(refiner, ds, case_ids, budget_s, progress, bundle.path / SCORES_FILE)
    bundle.meta["refinement"] = record
    bundle.segmentation.network.cpu()
    bundle.registrar.cpu()
    bundle.save()
    return record


def reconfigure(model_dir: str | Path, dataset_dir: str | Path, n_cases: int, budget_s: float, device: torch.device,
                progress=print, from_scores: bool = False, resample: bool = False, command: str | None = None) -> dict:
    """`isl configure`: configure an existing bundle on its validation cases, or, for a bundle trained without any
    (or with `resample`), on a seeded sample of `n_cases` cases of the dataset that it neither trained on, uses as
    atlases, nor holds out as its test split (`command`: the command line, recorded for the card).
    `from_scores`: no search; re-make the decision by the current rule
    from the scores the last search left beside the bundle."""
    bundle = ISLBundle.load(model_dir)
    ds = load_dataset(dataset_dir)
    meta = bundle.meta
    if command:
        meta["configure_command"] = command
    if from_scores:
        from isl.training.configure import decision_record, load_scores

        path = bundle.path / SCORES_FILE
        if not path.is_file():
            raise BundleError(f"{path} is missing: run `isl configure` without --from-scores first (it searches and "
                               "leaves the scores there)")
        ids, per_case = load_scores(path)
        previous = meta.get("refinement") or {}
        record = decision_record(per_case, ids, bundle.segmentation.labels, bundle.refinement_config(), progress)
        meta["refinement"] = record | {k: previous[k] for k in ("global_alignment", "seconds", "budget_seconds")
                                       if k in previous}
        bundle.save()
        write_model_card(bundle.path, meta, dataset_metadata(ds.root))
        progress(f"wrote {bundle.path} ({bundle.version})")
        return meta["refinement"]
    ids = [] if resample else list(meta.get("validation_cases") or [])
    if not ids:
        used = set(meta.get("train_cases", [])) | set(meta.get("atlases", [])) | set(meta.get("holdout_cases", []))
        free = sorted(c.case_id for c in ds.cases if c.case_id not in used)
        if len(free) < 2:
            raise DatasetError(f"{ds.root}: {len(free)} case(s) that model {bundle.version} neither trained on, uses "
                               "as atlases nor holds out; configuration needs at least 2")
        rng = np.random.default_rng(0)
        ids = sorted(rng.choice(free, min(n_cases, len(free)), replace=False).tolist())
        meta["validation_cases"] = ids
    progress(f"configuring {bundle.version} on {len(ids)} validation cases: {', '.join(ids)}")
    record = configure_bundle(bundle, ds, ids, budget_s, device, progress)
    write_model_card(bundle.path, bundle.meta, dataset_metadata(ds.root))
    progress(f"wrote {bundle.path} ({bundle.version})")
    return record


def _meta(ds: Dataset, cfg: BundleTrainConfig, out_dir: Path, held, val_ids, train_ids, pool, label_notes,
          training) -> dict:
    return {
        "name": cfg.name or Path(out_dir).name,
        "command": cfg.command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {"name": ds.name, "folder": ds.root.name, "labels": {str(k): v for k, v in ds.labels.items()},
                    "channels": ds.channel_names, **({"segment_codes": ds.segment_codes} if ds.segment_codes else {})},
        "train_cases": train_ids,
        "holdout_cases": held,
        "validation_cases": val_ids,
        "atlases": pool,
        "label_notes": label_notes,
        "config": cfg.model_dump(mode="json"),
        "training": training,
    }
