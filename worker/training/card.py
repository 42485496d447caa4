"""The model card written beside every bundle: what data, which split, how trained, what licence."""
from __future__ import annotations

import json
from pathlib import Path

from segmentation.files import atomic_write_text


def write_model_card(bundle_dir: Path, meta: dict, dataset_meta: dict) -> Path:
    cfg = meta["config"]
    train = meta["training"]
    licence = dataset_meta.get("licence") or dataset_meta.get("license") or "see the dataset's own terms"
    lines = [
        f"# Model card: {meta['name']}",
        "",
        f"- Version: `{meta['version']}`; created {meta['created']} with torch {train['torch']} on {train['device']}.",
        f"- Made by: `{meta.get('command') or 'the Python API (worker.training.train.train_bundle)'}`",
        f"- Task: segmentation of {', '.join(v for k, v in meta['dataset']['labels'].items() if k != '0')} "
        f"on {', '.join(meta['dataset']['channels'])} images, refined per scan by inference-specific learning.",
        "",
        "## Data and split",
        f"- Dataset: {meta['dataset']['name']} (folder `{meta['dataset']['folder']}`). "
        f"{dataset_meta.get('description', '')}",
        f"- Reference: {dataset_meta.get('reference', 'n/a')}. Licence: {licence}.",
        f"- Held out (never trained on, the evaluation split): the first {len(meta['holdout_cases'])} cases in sorted "
        "order"
        + (f" ({meta['holdout_cases'][0]} to {meta['holdout_cases'][-1]})." if meta["holdout_cases"] else "."),
        f"- Trained on {len(meta['train_cases'])} cases: {', '.join(meta['train_cases'])}.",
        f"- Atlases (by case id; give their dataset folder with `--atlas-dir`): {', '.join(meta['atlases'])}.",
        *([f"- Label notes: {'; '.join(meta['label_notes'])}."] if meta.get("label_notes") else []),
        "",
        "## Training",
        f"- Segmentation: MONAI UNet {cfg['network']['channels']}, {cfg['training']['iterations']} iterations "
        f"(batch {cfg['training']['batch_size']}, lr {cfg['training']['lr']}), {train['segmentation_seconds']} s, "
        f"final loss {train['segmentation_final_loss']}.",
        f"- Registration: VxmPairwise {cfg['registration']['nb_features']}, {cfg['registration']['iterations']} "
        "iterations, "
        f"{train['registration_seconds']} s, final loss {train['registration_final_loss']:.4f}.",
        "",
        "## Metrics",
        "Measured by `isl evaluate` on held-out cases: `evaluation.json` beside this card holds every per-case figure"
        " and the command that made it (absent until evaluated).",
        "",
        "## Intended use and limits",
        "Research and evaluation software; not a medical device. The refined mask is only as good as the atlases"
        " resemble the scan: check the QA block of each report (folding, agreement with the baseline).",
    ]
    return atomic_write_text(bundle_dir / "MODEL_CARD.md", "\n".join(lines) + "\n")


def dataset_metadata(root: Path) -> dict:
    path = Path(root) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}
