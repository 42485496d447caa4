"""The human-in-the-loop protocol of the pituitary study (Radiology Practice 2024), replayed on real labelled data,
and printed as JSON (and a figure beside it).

    python -m benchmarks.hitl_protocol --dataset ../shared/data/hippocampus --skip 48 --start 3 --batches 4 \
        --batch-size 6 --json benchmarks/results/hitl_protocol_hippocampus.json

A model is trained on `start` labelled cases (seeded sample of the cases after the first `skip` in sorted order, the
test split of the committed bundles, never touched here). Then, batch after batch of new cases:
1. the live model segments the batch, three ways:
   - `baseline`: the network alone;
   - `isl`: ISL with the model's own atlases (corrections reach it only through retraining);
   - `isl_bank`: ISL with every corrected case so far joining the atlas bank at once (the product's default,
     ISL_CORRECTIONS_AS_ATLASES);
2. the manual label plays the radiologist's correction; agreement is computed as the service computes it
   (service/agreement.py: volumes before and after with a paired t-test and Wilcoxon, Spearman, Dice, the verdict
   with the study's 0.94 and 0.97);
3. the corrected cases join the atlas bank (for `isl_bank`), and the model is retrained on its start cases plus
   the corrected cases so far (isl/training/retrain.py, warm start), the new version serving the next batch.
   The product's own rules decide, as `isl train` and a retraining apply them: a model of fewer than 10 cases
   cannot set validation cases aside, so it returns the network's own mask; once start and corrected cases reach
   10, a retraining holds a fifth of the new corrections back, configures refinement on them (ISL, or the
   network's own mask where no ISL setting beats it) and is judged on them by the promotion rule. A version the
   rule rejects is not used (its parent stays live); one it could not judge is used, as in the study.
   `--unconfigured` replays the protocol with ISL's hand-set defaults instead (`--validation 0 --no-configure`),
   as the product ran small models before.
A structure a case does not contour (partial labels) is neither scored nor trained on for that case.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REQUIRED, add_options, stamped

ARMS = ("baseline", "isl", "isl_bank")


def view(ds, ids: list[str], folder: Path) -> Path:
    """A dataset folder holding only `ids` (links to the files, never copies), with its cases.json."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case_id in ids:
        case = ds.case(case_id)
        for path in (*case.image_paths, case.label_path):
            link = folder / path.parent.name / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    (folder / "dataset.json").write_text((ds.root / "dataset.json").read_text())
    if (ds.root / "cases.json").is_file():
        rows = [r for r in json.loads((ds.root / "cases.json").read_text()) if r["case"] in ids]
        (folder / "cases.json").write_text(json.dumps(rows))
    return folder


def structures(ds, case_id: str) -> list[str]:
    case = ds.case(case_id)
    return [n for v, n in ds.labels.items() if v != 0 and case.present(ds.labels)[list(ds.labels).index(v)]]


def segment(refiner, ds, case_id: str, extra) -> tuple[dict, float]:
    """Per method: per contoured structure, (automatic mL, reference mL, Dice); and the seconds of one ISL run."""
    from imaging.dataset import load_case
    from imaging.metrics import dice
    from segmentation.preprocess import to_native

    images, label, _ = load_case(ds, ds.case(case_id))
    x, canonical = refiner.pre.images(images)
    t0 = time.perf_counter()
    res = refiner.refine(x, None, extra)
    seconds = time.perf_counter() - t0
    geometry = images[0].geometry
    ml = float(np.prod(geometry.spacing)) / 1000
    names = {v: n for v, n in refiner.bundle.segmentation.labels.items() if v}
    present = structures(ds, case_id)
    out = {}
    for method, probs in (("auto", res.probs), ("baseline", res.baseline)):
        mask = to_native(probs, canonical, geometry)
        scores = dice(mask, label.array, [v for v, n in names.items() if n in present])
        out[method] = {names[v]: (np.count_nonzero(mask == v) * ml, np.count_nonzero(label.array == v) * ml, float(d))
                       for v, d in scores.items()}
    return out, seconds


def batch_agreement(rows: list[dict]) -> dict:
    from service.agreement import structure_agreement, verdict

    names = sorted({n for r in rows for n in r})
    per = {}
    for name in names:
        cases = [r[name] for r in rows if name in r]
        per[name] = structure_agreement([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases], 0.05)
    mean = float(np.mean([np.mean([r[n][2] for n in r]) for r in rows]))
    return {"mean_dice": round(mean, 4), "structures": per, **verdict(per, len(rows), 0.94, 0.97)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(ap, dataset=REQUIRED, json=REQUIRED)
    ap.add_argument("--work", default=None, help="scratch folder for the bundles (default: /tmp/hitl_<dataset>)")
    ap.add_argument("--skip", type=int, default=0, help="never use the first N cases in sorted order (a test split)")
    ap.add_argument("--start", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=1000, help="initial segmentation training iterations")
    ap.add_argument("--reg-iterations", type=int, default=400)
    ap.add_argument("--retrain-iterations", type=int, default=500)
    ap.add_argument("--retrain-reg-iterations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    add_options(ap, threads=None)
    ap.add_argument("--unconfigured", action="store_true",
                    help="ISL's hand-set defaults on every version: no configuration, every version used")
    ap.add_argument("--from-json", action="store_true", help="no run: recompute the summary and the figure of --json")
    return ap.parse_args(argv)


def draw(ds, args) -> tuple[list[str], list[list[str]]]:
    """The start cases and the batches: a seeded sample of the cases after the first --skip in sorted order."""
    pool = sorted(c.case_id for c in ds.cases)[args.skip:]
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(pool, args.start + args.batches * args.batch_size, replace=False).tolist()
    start, later = sorted(picked[: args.start]), picked[args.start:]
    return start, [sorted(later[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.batches)]


def train_start(base: Path, bundle_dir: Path, args, device) -> float:
    """The first version, trained on the start cases (once: a run that resumes finds it): its seconds."""
    from isl.training.train import BundleTrainConfig, train_bundle

    cfg = BundleTrainConfig(name="hitl", **({"validation": 0, "configure": False} if args.unconfigured else {}))
    cfg.training.iterations, cfg.registration.iterations = args.iterations, args.reg_iterations
    t0 = time.perf_counter()
    if not (bundle_dir / "bundle.json").is_file():
        train_bundle(base, bundle_dir, cfg, device, progress=lambda m: None)
    return round(time.perf_counter() - t0, 1)


def segment_batch(bundle, base: Path, ds, b: int, ids: list[str], bank, device) -> dict:
    """Step 1 and 2 for one batch: the live version segments it three ways; each arm's agreement with the
    corrections and ISL's seconds per case."""
    from isl.refiner import Refiner

    refiner = Refiner(bundle, bundle.load_atlases(base), bundle.refinement_config({"device": "cpu"}), device)
    rows = {arm: [] for arm in ARMS}
    seconds = {"isl": [], "isl_bank": []}
    for case_id in ids:
        own, t_own = segment(refiner, ds, case_id, None)
        joined, t_joined = segment(refiner, ds, case_id, bank) if bank is not None else (own, t_own)
        rows["baseline"].append(own["baseline"])
        rows["isl"].append(own["auto"])
        rows["isl_bank"].append(joined["auto"])
        seconds["isl"].append(t_own)
        seconds["isl_bank"].append(t_joined)
        print(f"batch {b + 1} {case_id}: " + " ".join(
            f"{arm} {np.mean([v[2] for v in rows[arm][-1].values()]):.4f}" for arm in ARMS), flush=True)
    arms = {arm: batch_agreement(rows[arm]) for arm in ARMS}
    for arm in ("isl", "isl_bank"):
        arms[arm]["median_seconds_per_case"] = round(float(np.median(seconds[arm])), 1)
    print(json.dumps({"batch": b + 1, **{a: (arms[a]["mean_dice"], arms[a]["converged"]) for a in ARMS}}),
          flush=True)
    return {"batch": b + 1, "cases": ids, "model_version": bundle.version, "refinement": refiner.decision,
            "atlases": len(bundle.atlas_ids) + (0 if bank is None else len(bank.case_ids)), "arms": arms}


def correct(bundle, ds, ids: list[str], corrections: list, bank):
    """Step 3's first half: the batch's corrections come back and join the atlas bank; the bank with them."""
    import torch

    from imaging.dataset import load_case
    from isl.training.retrain import Correction

    for case_id in ids:
        case = ds.case(case_id)
        c = Correction(id=case_id, image=case.image_paths[0], label=case.label_path,
                       structures=structures(ds, case_id))
        corrections.append(c)
        vols, label, _ = load_case(ds, case)
        atlas = bundle.case_atlas(case_id, vols, label)
        atlas.known = torch.from_numpy(c.known(bundle.segmentation.labels))[None]
        bank = atlas if bank is None else bank.plus(atlas)
    return bank


def retrain_on(bundle_dir: Path, base: Path, corrections: list, child: Path, args, device) -> tuple[dict, float]:
    """Step 3's second half: the live version retrained on the corrections so far (once: a run that resumes finds
    it), and whether the product's rule puts it live; with the seconds it took."""
    from isl.bundle import ISLBundle
    from isl.training.retrain import RetrainConfig, retrain

    t0 = time.perf_counter()
    if not (child / "bundle.json").is_file():
        retrain(bundle_dir, base, corrections, child,
                RetrainConfig(iterations=args.retrain_iterations, reg_iterations=args.retrain_reg_iterations,
                              configure=False if args.unconfigured else None), device,
                progress=lambda m: None)
    seconds = round(time.perf_counter() - t0, 1)
    meta = ISLBundle.load(child, device).meta
    verdict = meta["promotion"]
    used = args.unconfigured or verdict["promoted"] or not verdict["judged"]
    print(json.dumps({"retrained": meta["version"], "used": used, "verdict": verdict["reason"]}), flush=True)
    return {"version": meta["version"], "held_back": meta.get("held_back_corrections", []),
            "verdict": verdict["reason"], "used": used}, seconds


def replay(args) -> dict:
    """The protocol, batch after batch, as the module's description says."""
    import torch

    from imaging.dataset import load_dataset
    from isl.bundle import ISLBundle

    t_all, device, ds = time.perf_counter(), torch.device("cpu"), load_dataset(args.dataset)
    start, batches = draw(ds, args)
    work = Path(args.work or f"/tmp/hitl_{Path(args.dataset).name}")
    base, bundle_dir = view(ds, start, work / "start"), work / "v0"
    train_seconds = [train_start(base, bundle_dir, args, device)]
    corrections, bank, out_batches = [], None, []
    for b, ids in enumerate(batches):
        bundle = ISLBundle.load(bundle_dir, device)
        out_batches.append(segment_batch(bundle, base, ds, b, ids, bank, device))
        bank = correct(bundle, ds, ids, corrections, bank)
        if b + 1 < len(batches):
            retraining, seconds = retrain_on(bundle_dir, base, corrections, work / f"v{b + 1}", args, device)
            train_seconds.append(seconds)
            out_batches[-1]["retraining"] = retraining
            if retraining["used"]:
                bundle_dir = work / f"v{b + 1}"
    return stamped({"dataset": ds.name, "start_cases": start, "unconfigured": args.unconfigured,
                    "batches": out_batches, "training_seconds": train_seconds,
                    "rule": {"alpha": 0.05, "dice_min": 0.94, "spearman_min": 0.97},
                    "seconds": round(time.perf_counter() - t_all, 1), "threads": torch.get_num_threads()})


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.from_json:
        result = json.loads(Path(args.json).read_text())
        write(result, Path(args.json))
        print(markdown(result))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    write(replay(args), Path(args.json))


def summary(result: dict) -> dict:
    """Per arm: the first batch that converged by the study's whole rule, the first batch from which no
    structure's volumes differed in any later batch (the volume half of the rule alone), mean Dice per batch, and
    the gain over the network alone."""
    batches = result["batches"]
    out = {}
    for arm in ARMS:
        agree = [not any(s["volumes_differ"] for s in x["arms"][arm]["structures"].values()) for x in batches]
        stays = next((batches[i]["batch"] for i in range(len(batches)) if all(agree[i:])), None)
        dice = [x["arms"][arm]["mean_dice"] for x in batches]
        base = [x["arms"]["baseline"]["mean_dice"] for x in batches]
        out[arm] = {"first_converged_batch": next((x["batch"] for x in batches if x["arms"][arm]["converged"]), None),
                    "volumes_agree_from_batch": stays, "mean_dice_per_batch": dice,
                    "gain_over_baseline_points": [round((d - b) * 100, 2) for d, b in zip(dice, base)],
                    "why_not_converged_last_batch": batches[-1]["arms"][arm]["why"]}
    return out


def markdown(result: dict) -> str:
    """The results page's table of a run: per batch, what the live version returned, Dice, the smallest volume
    p-value and the lowest Spearman over the structures, and ISL's seconds per case, per arm."""
    def low(arms: dict, arm: str, key: str) -> str:
        values = [s[key] for s in arms[arm]["structures"].values() if s[key] is not None]
        return f"{min(values):.3f}" if values else "-"

    rows = ["| batch | returned | baseline Dice | ISL Dice | ISL + bank Dice | smallest volume t-test p (baseline / "
            "ISL / bank) | lowest Spearman (baseline / ISL / bank) | s/case (ISL / bank) |",
            "|---|---|---|---|---|---|---|---|"]
    for x in result["batches"]:
        arms = x["arms"]
        returned = (x.get("refinement") or {}).get("method", "isl")
        rows.append(f"| {x['batch']} | {returned} | " + " | ".join(f"{arms[a]['mean_dice']:.4f}" for a in ARMS)
                    + " | " + " / ".join(low(arms, a, "t_test_p") for a in ARMS) + " | "
                    + " / ".join(low(arms, a, "spearman_rho") for a in ARMS) + " | "
                    + " / ".join(f"{arms[a]['median_seconds_per_case']}" for a in ARMS[1:]) + " |")
    return "\n".join(rows)


def write(result: dict, path: Path) -> None:
    result["summary"] = summary(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    figure(result, path.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))


def figure(result: dict, path: Path) -> None:
    """Mean Dice per batch, and the smallest volume p-value over the structures, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [x["batch"] for x in result["batches"]]
    for arm, style in zip(ARMS, ("o-", "s-", "^-")):
        a.plot(xs, [x["arms"][arm]["mean_dice"] for x in result["batches"]], style, label=arm)
        ps = [min([s["t_test_p"] for s in x["arms"][arm]["structures"].values() if s["t_test_p"] is not None],
                  default=np.nan) for x in result["batches"]]
        b.plot(xs, ps, style, label=arm)
    a.set_xticks(xs)
    b.set_xticks(xs)
    a.axhline(0.94, color="grey", ls=":", lw=1)
    b.axhline(0.05, color="grey", ls=":", lw=1)
    b.set_yscale("log")
    a.set(xlabel="batch", ylabel="mean Dice vs correction", title=f"{result['dataset']}: Dice per batch")
    b.set(xlabel="batch", ylabel="smallest paired t-test p (structures)", title="volumes before vs after correction")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
