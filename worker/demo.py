"""`isl demo`: a synthetic phantom dataset with shape and intensity variability, a small model trained
for a few minutes, and ISL on held-out phantoms, with Dice before and after. Needs no data, no GPU."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

SHAPE = (40, 48, 40)  # z, y, x
LABELS = {0: "background", 1: "head", 2: "tail"}


def _rotation(rng) -> np.ndarray:
    a, b, c = rng.uniform(-0.35, 0.35, 3)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def phantom(rng: np.random.Generator, shape=SHAPE, contrast_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A bent, rotated two-part ellipsoid (head and tail) in textured tissue; image (MR-like units) and labels."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    center = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
    coords = np.einsum("ij,j...->i...", _rotation(rng), grid - center[:, None, None, None])
    radii = np.array([6.0, 14.0, 6.5]) * rng.uniform(0.8, 1.2, 3)
    bend = rng.uniform(-0.04, 0.04)
    coords[0] += bend * coords[1] ** 2  # banana-shaped, like a hippocampus
    inside = ((coords / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
    split = rng.uniform(-0.2, 0.2) * radii[1]
    labels = np.where(inside, np.where(coords[1] < split, 1, 2), 0).astype(np.uint8)
    # smooth random warp of the labels for shape variability
    disp = np.stack([gaussian_filter(rng.normal(0, 1, shape), 4) * 20 for _ in range(3)])
    labels = map_coordinates(labels, grid + disp, order=0, mode="nearest").astype(np.uint8)
    tissue = gaussian_filter(rng.normal(0, 1, shape), 2) * 8 + 60
    tissue[labels == 1] += 35 + contrast_shift + rng.normal(0, 4)
    tissue[labels == 2] += 28 + contrast_shift + rng.normal(0, 4)
    ring = np.logical_xor(gaussian_filter(inside.astype(float), 2) > 0.15, inside)
    tissue[ring] -= 15  # a darker rim around the structure, as white matter/CSF would
    bias = np.exp(gaussian_filter(rng.normal(0, 1, shape), 10) * 6)
    image = gaussian_filter(tissue, 0.7) * bias * rng.uniform(0.5, 2.0) + rng.normal(0, 4, shape)
    return image.astype(np.float32), labels


def make_dataset(root: Path, n_train: int, n_test: int, seed: int = 0) -> list[str]:
    """Write an MSD-layout phantom dataset; returns the ids of the test cases (listed first)."""
    from imaging.io import Geometry, write_image, write_label_map

    rng = np.random.default_rng(seed)
    geometry = Geometry(SHAPE[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ids = [f"phantom_{i:03d}" for i in range(n_train + n_test)]
    for i, case_id in enumerate(ids):
        image, labels = phantom(rng, contrast_shift=-12.0 if i < n_test else 0.0)
        write_image(image, geometry, root / "imagesTr" / f"{case_id}.nii.gz")
        write_label_map(labels, geometry, root / "labelsTr" / f"{case_id}.nii.gz")
    meta = {"name": "Phantom", "description": "synthetic two-part structures made by isl demo",
            "channel_names": {"0": "MRI"}, "labels": {n: v for v, n in LABELS.items()}, "numTraining": len(ids),
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return ids[:n_test]


# ISL with every stage, on a scale for tests: 3 atlases, 8 fine-tuning steps with a re-registration after 4, no
# mirror averaging at the end. A tiny bundle refines a phantom in about 3 s instead of 11 s (1 CPU thread).
QUICK_REFINEMENT = {"atlases": 3, "finetune_steps": 8, "min_steps": 4, "reregister_every": 4, "reregister_steps": 2,
                    "predict_every": 2, "final_flips": False}


def train_tiny_bundle(dataset: Path, out: Path, refinement: dict | None = None) -> Path:
    """A bundle trained for a few iterations on phantoms (holding out the first 2 cases): every code path of
    the engine and the service in seconds, for tests and service benchmarks. Not a model to use. `refinement`
    (ISLConfig fields, e.g. QUICK_REFINEMENT): the bundle's refinement settings, else the ISLConfig defaults."""
    import torch

    from isl.training.train import BundleTrainConfig, train_bundle

    cfg = BundleTrainConfig(holdout=2, validation=0, name=Path(out).name)
    cfg.training.iterations, cfg.registration.iterations = 30, 20
    train_bundle(dataset, out, cfg, torch.device("cpu"), progress=lambda m: None)
    if refinement is not None:
        set_refinement(out, refinement, dataset)
    return Path(out)


def set_refinement(bundle_dir: Path, fields: dict, dataset: Path) -> str:
    """Write the ISLConfig `fields` (over the defaults) into a bundle as its refinement settings, set by hand and
    not configured on any data (the record and the card say so), for tests and benchmarks; `dataset` is the folder
    it trained on (for the card). Returns the bundle's new version."""
    from isl.bundle import ISLBundle
    from isl.config import ISLConfig
    from isl.training.card import dataset_metadata, write_model_card

    bundle = ISLBundle.load(bundle_dir)
    config = ISLConfig.model_validate(fields)
    bundle.meta["refinement"] = {
        "config": config.model_dump(mode="json", exclude={"device"}),
        "decision": {"method": config.method, "configured": False,
                     "reason": f"set by hand, not configured on any data: {json.dumps(fields, sort_keys=True)}"},
        "validation_cases": [], "table": [], "per_label": {}, "seconds": 0.0, "budget_seconds": 0.0}
    bundle.save()
    write_model_card(bundle.path, bundle.meta, dataset_metadata(Path(dataset)))
    return bundle.meta["version"]


def run_demo(out: str | Path, minutes: float = 3.0, device: str = "auto", n_train: int = 12, n_test: int = 4,
             progress=print) -> int:
    from isl.evaluation.evaluate import evaluate
    from isl.refiner import pick_device
    from isl.training.train import BundleTrainConfig, train_bundle

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    make_dataset(data, n_train, n_test)
    progress(f"made {n_train + n_test} phantoms in {data} ({n_test} held out, with lower contrast)")
    # no self-configuration: 3 validation phantoms would decide nothing; `isl train` on real data does it
    cfg = BundleTrainConfig(holdout=n_test, validation=0, name="phantom-demo")
    seconds = minutes * 60
    cfg.training.iterations = max(100, int(seconds * 0.65 / 0.11))  # about 0.11 s per step on 2 CPU threads
    cfg.registration.iterations = max(100, int(seconds * 0.2 / 0.12))
    dev = pick_device(device)
    train_bundle(data, out / "model", cfg, dev, progress=progress)
    result = evaluate(data, out / "model", out / "evaluation.json", cfg={"device": device}, progress=progress)
    s = result["summary"]
    progress(f"\nDice (mean over {s['n_cases']} held-out phantoms and both labels):\n"
             f"  baseline {s['mean_dice_baseline']:.4f}\n  ISL      {s['mean_dice_isl']:.4f}  "
             f"({(s['mean_dice_isl'] - s['mean_dice_baseline']) * 100:+.2f} points)\n"
             f"  flip TTA {s['mean_dice_tta_flip']:.4f}, TENT {s['mean_dice_tent']:.4f}, majority vote "
             f"{s['mean_dice_majority_vote']:.4f}\n"
             f"outputs in {out}/ (model/, evaluation.json, evaluation.png); total {time.perf_counter() - t0:.0f} s")
    return 0 if s["mean_dice_isl"] > s["mean_dice_baseline"] else 1
