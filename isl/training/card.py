"""The model card written beside every bundle: what data, which split, how trained, what licence."""
from __future__ import annotations

import json
from pathlib import Path

from imaging.files import atomic_write_text
from isl.meta import BundleMeta, Refinement


def write_model_card(bundle_dir: Path, meta: dict, dataset_meta: dict) -> Path:
    cfg = meta["config"]
    train = meta["training"]
    licence = dataset_meta.get("licence") or dataset_meta.get("license") or "see the dataset's own terms"
    lines = [
        f"# Model card: {meta['name']}",
        "",
        f"- Version: `{meta['version']}`; created {meta['created']} with torch {train['torch']} on {train['device']}.",
        f"- Made by: `{meta.get('command') or 'the Python API (isl.training.train.train_bundle)'}`"
        + (f", then `{meta['configure_command']}`" if meta.get("configure_command") else ""),
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
        *_transfer(meta.get("transfer")),
        *([f"- Retrained from `{meta['parent']}` (lineage, oldest first: {' > '.join(meta.get('lineage', []))}) on "
           f"those cases plus {len(meta.get('corrections', []))} radiologists' corrections "
           f"({', '.join(meta.get('corrections', [])) or 'none'}); warm start: {train.get('warm_start', False)}."]
          if meta.get("parent") else []),
        *([f"- Corrections held back from training, to configure and judge this version on: "
           f"{', '.join(meta['held_back_corrections'])}."] if meta.get("held_back_corrections") else []),
        *([f"- Promotion rule: {meta['promotion']['reason']}."] if meta.get("promotion") else []),
        *([f"- Validation (configuration only; neither trained on nor atlases): {', '.join(meta['validation_cases'])}."]
          if meta.get("validation_cases") else []),
        f"- Atlases (by case id; give their dataset folder with `--atlas-dir`): {', '.join(meta['atlases'])}.",
        *([f"- Label notes: {'; '.join(meta['label_notes'])}."] if meta.get("label_notes") else []),
        "",
        "## Training",
        f"- Segmentation: MONAI UNet {cfg['network']['channels']}, {cfg['training']['iterations']} iterations "
        f"(batch {cfg['training']['batch_size']}, lr {cfg['training']['lr']}), {train['segmentation_seconds']} s, "
        f"final loss {train['segmentation_final_loss']}.",
        *_ensemble(meta.get("ensemble")),
        f"- Registration: VxmPairwise {cfg['registration']['nb_features']}, {cfg['registration']['iterations']} "
        "iterations, "
        f"{train['registration_seconds']} s, final loss {train['registration_final_loss']:.4f}.",
        "",
        *_configuration(BundleMeta.model_validate(meta).refinement),
        *_metrics(bundle_dir / "evaluation.json"),
        "## Intended use and limits",
        "Research and evaluation software; not a medical device. The refined mask is only as good as the atlases"
        " resemble the scan: check the QA block of each report (folding, agreement with the baseline).",
    ]
    return atomic_write_text(bundle_dir / "MODEL_CARD.md", "\n".join(lines) + "\n")


def _ensemble(plan: dict | None) -> list[str]:
    """How an ensemble's members were trained and are combined."""
    if not plan:
        return []
    how = "probability averaging" if plan["combine"] == "mean" else "majority vote (ties by the mean probability)"
    if plan["kind"] == "per_sequence":
        what = f"one per sequence ({', '.join(plan['sequences'])}), each trained on its own sequence of every case"
    else:
        sizes = ", ".join(str(len(c)) for c in plan["member_cases"])
        what = f"one per fold, each trained without its fold ({sizes} cases)"
    return [f"- Ensemble of {plan['members']} such networks, {what}, combined by {how}; ISL refines the ensemble's "
            "mask and fine-tunes the ensemble as one network (on the mean of its members)."]


def _transfer(record: dict | None) -> list[str]:
    """The transfer-learning lineage of a bundle trained with `--init-from`."""
    if not record:
        return []
    chain = " > ".join(f"{a['name']} ({a['dataset']}: {', '.join(a['channels'])}; {', '.join(a['labels'])})"
                       for a in record["lineage"])
    seg, reg = record["segmentation"], record.get("registration") or {}
    new = sorted({n.rsplit(".", 1)[0].split(".conv")[0] + ": " + why for n, why in seg.get("new_tensors", {}).items()})
    return [f"- Transferred from `{record['name']}` ({record['version']}, read from `{record['from']}`); transfer "
            f"lineage, oldest first: {chain} > this bundle. Segmentation network: {seg['copied']} tensors copied, "
            f"{seg['new']} new ({'; '.join(new) or 'none'}); registration network: {reg.get('copied', 0)} copied, "
            f"{reg.get('new', 0)} new. Encoder held still for the first {record['freeze_encoder_steps']} "
            f"iterations; learning rate {record['lr']}."]


def _global_stage(record: dict | None) -> list[str]:
    if not record:
        return []
    means = ", ".join(f"{kind} {m:.4f}" for kind, m in record["fusion_mean_dice"].items())
    return [f"Global stage before the registration: **{record['kind']}** (fusion of {record['atlases']} warped "
            f"atlases alone, mean Dice on {record['cases']} validation cases: {means}).", ""]


def _configuration(record: Refinement | None) -> list[str]:
    if not record:
        return ["## Refinement configuration", "Not configured: refinement runs ISL with the defaults of `ISLConfig`, "
                "unchecked on this data (trained with `--validation 0` or `--no-configure`).", ""]
    if not record.validation_cases:
        return ["## Refinement configuration", f"Not configured: {record.decision.reason}.", ""]
    cfg = record.config
    lines = ["## Refinement configuration",
             f"Searched by `isl train` / `isl configure` on {len(record.validation_cases)} validation cases in "
             f"{record.seconds} s "
             f"(budget {record.budget_seconds:.0f} s): {record.decision.reason}.",
             f"Refinement returns **{record.decision.method}**. ISL setting: K = {cfg['atlases']}, "
             f"{cfg['finetune_steps']} fine-tuning steps, fusion weight {cfg['fusion_weight']}, fusion beta "
             f"{cfg['fusion_beta']} / search {cfg['fusion_search']}, mirror averaging of the start "
             f"{cfg['mask_flips']} and of the tuned network {cfg['final_flips']}, the tuned network inferred over "
             f"{'the region of interest' if cfg.get('final_inference') == 'roi' else 'the whole scan'}, per-case "
             f"safety threshold {cfg['min_agreement']}; per-label fusion weights "
             f"{', '.join(f'{k} {v}' for k, v in (cfg.get('label_fusion_weights') or {}).items()) or 'none'}; labels "
             f"left as the network's mask: {', '.join(cfg.get('keep_start') or []) or 'none'}.", "",
             *_global_stage(record.global_alignment),
             "| candidate | mean Dice | improved | worsened |", "|---|---|---|---|"]
    lines += [f"| {r['candidate']} | {r['mean_dice']:.4f} | {r['improved']} | {r['worsened']} |"
              for r in record.table]
    if record.per_label:
        lines += ["", "Per label, the ISL setting above against the starting mask on the validation cases that "
                  "contour it:", "", "| label | cases | start | ISL | fusion weight |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['n']} | {r['start']:.4f} | {r['isl']:.4f} | "
                  f"{'left as the start' if r['fusion_weight'] is None else r['fusion_weight']} |"
                  for name, r in record.per_label.items()]
    return [*lines, ""]


def _metrics(path: Path) -> list[str]:
    lines = ["## Metrics"]
    if not path.is_file():
        return [*lines, "Measured by `isl evaluate` on held-out cases into `evaluation.json` beside this card "
                "(absent until evaluated).", ""]
    result = json.loads(path.read_text())
    s = result["summary"]
    methods = [m for m in ("baseline", "isl", "tta_flip", "tent", "majority_vote", "fusion_only", "network_only")
               if f"mean_dice_{m}" in s]
    p = s["wilcoxon_p_isl_vs_baseline"]
    lines += [f"`{result.get('command')}` on {s['n_cases']} held-out cases ({result.get('device')}): ISL improved "
              f"{s['cases_improved']} cases and worsened {s['cases_worsened']} (Wilcoxon p vs baseline "
              f"{'n/a: identical masks' if p is None else p}); median {s['median_seconds_isl_per_case']:.1f} s per "
              f"case, peak RSS {s['peak_rss_mb']:.0f} MB.", "", "| label | " + " | ".join(methods) + " |",
              "|---" * (len(methods) + 1) + "|",
              "| **mean** | " + " | ".join(f"{s[f'mean_dice_{m}']:.4f}" for m in methods) + " |"]
    for name, row in (s.get("per_label") or {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.4f}" for m in methods if m in row) + " |")
    return [*lines, "", "Mean Dice per case over the labels its reference contours; `evaluation.json` holds every "
            "per-case figure.", ""]


def dataset_metadata(root: Path) -> dict:
    path = Path(root) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}
