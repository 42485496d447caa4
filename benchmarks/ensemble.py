"""Single network vs ensembles, each trained through `isl.training.train.train_bundle` as `isl train` trains it,
scored on cases none of them trained on. Prints JSON (and writes it, arm by arm, to --json: a run resumes).

k-fold ensembles on a test split (a single network on N cases against a K-fold ensemble of the same N cases):

    python -m benchmarks.ensemble folds --dataset ../shared/data/hippocampus --holdout 48 --test 15 --cases 10 \\
        --folds 5 --iterations 600 --reg-iterations 300 --isl --work scratch/ensemble_hippocampus \\
        --json benchmarks/results/ensemble_hippocampus.json

Sequences, leave one case out (every case is the test case of one round; each arm trains once per round), scored
on the BraTS regions:

    python -m benchmarks.ensemble sequences --dataset ../shared/data/brats_multiseq --resample 3 \\
        --iterations 300 --reg-iterations 30 --region whole=1,2,3,4 --region core=1,3,4 --region enhancing=4 \\
        --work scratch/ensemble_brats --json benchmarks/results/ensemble_brats_multiseq.json

An ensemble is trained once and read several ways (`variants`): its mean, its vote, and each member alone. Its
members train independently (each on its folds, or each on its own sequence), so a member alone is the network that
`isl train` would give on those cases or that sequence. `sequences` thus compares the multi-channel network, the
per-sequence ensemble (mean and vote) and each sequence alone. --resample MM first writes a copy of the dataset
resampled to MM mm voxels under --work (`benchmarks.dataset_views`; a benchmark's shortcut on a CPU: 1 mm glioma
volumes make a region of interest too large to train on here). Every arm: fixed iterations, --validation 0 (the
networks are compared; refinement is not configured), the network's mask only unless --isl (ISL then on top of the
networks and ensembles, ISLConfig defaults, unchecked). Scored on the preprocessing's grid, over the labels each
reference contours or over --region unions the reference holds; each variant against the single (or multi-channel)
network with the paired difference in points, cases better/worse and the Wilcoxon p.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REQUIRED, add_options, command, provenance
from benchmarks.dataset_views import leave_out, resampled
from imaging.dataset import load_case, load_dataset
from imaging.metrics import dice
from isl.refiner import load_refiner
from isl.training.train import BundleTrainConfig, train_bundle
from segmentation.infer import predict
from segmentation.network import Ensemble


def variants(net, names: list[str] | None = None) -> dict[str, torch.nn.Module]:
    """What one trained bundle's network can show: the network itself, or for an ensemble its mean, its vote and each
    member alone (`names`: the members' names, e.g. their sequences). No retraining: members are trained
    independently, so a member alone is the network an `isl train` of its cases (or its sequence) would give."""
    if not isinstance(net, Ensemble):
        return {"network": net}
    out = {combine: _Combined(net, combine) for combine in ("mean", "vote")}
    for k, member in enumerate(net.members):
        out[(names or [f"member{j + 1}" for j in range(len(net.members))])[k]] = _Member(
            member, k if net.member_inputs == "one_each" else None)
    return out


class _Combined(torch.nn.Module):
    def __init__(self, net: Ensemble, combine: str):
        super().__init__()
        self.net, self.combine = net, combine

    def forward(self, x):
        self.net.combine = self.combine
        return self.net(x)


class _Member(torch.nn.Module):
    def __init__(self, member: torch.nn.Module, channel: int | None):
        super().__init__()
        self.member, self.channel = member, channel

    def forward(self, x):
        return self.member(x if self.channel is None else x[:, self.channel: self.channel + 1])


def score(model_dir: Path, dataset: str, ids: list[str], isl: list[str], regions: dict[str, list[int]],
          names: list[str] | None = None) -> tuple[dict, dict]:
    """Per test case, each variant's mean Dice over the labels (or `regions`) its reference holds, and the Dice of each
    of those labels (regions); ISL on top of the variants named in `isl` (ISLConfig defaults, unchecked)."""
    refiner = load_refiner(model_dir, dataset, {"device": "cpu"})
    ds, labels_all = load_dataset(dataset), refiner.bundle.segmentation.labels
    nets = variants(refiner.net, names)
    rows, parts = {}, {}
    for case_id in ids:
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        known = {n: [v] for v, n, k in zip(labels_all, labels_all.values(), case.present(labels_all)) if v != 0 and k}
        x = refiner.pre.images(volumes)[0]
        truth = refiner.pre.label(label).astype(np.int64)
        part = {}
        for name, net in nets.items():
            refiner.net = net
            if name in isl:
                res = refiner.refine(x)
                part[name] = _parts(res.baseline, truth, regions or known)
                part[f"{name}+isl"] = _parts(res.probs, truth, regions or known)
            else:
                probs = predict(net, x, refiner.pre.patch_size, refiner.device, ())
                part[name] = _parts(probs, truth, regions or known)
        parts[case_id] = part
        rows[case_id] = {name: round(float(np.mean(list(d.values()))), 5) for name, d in part.items()}
    return rows, parts


def _parts(probs: np.ndarray, truth: np.ndarray, regions: dict[str, list[int]]) -> dict[str, float]:
    """Dice of each region (a union of labels; a label alone is a region of one) that the reference holds: a region
    absent from the reference is not scored (a Dice of an absent structure says nothing of the network)."""
    pred = probs.argmax(0)
    return {name: round(dice(np.isin(pred, r).astype(np.int64), np.isin(truth, r).astype(np.int64), [1])[1], 5)
            for name, r in regions.items() if np.isin(truth, r).any()}


def train(args, dataset: str, out: Path, **fields) -> float:
    cfg = BundleTrainConfig(validation=0, name=out.name, **fields)
    cfg.training.iterations, cfg.registration.iterations = args.iterations, args.reg_iterations
    t0 = time.perf_counter()
    train_bundle(dataset, out, cfg, torch.device("cpu"), progress=lambda m: None)
    return round(time.perf_counter() - t0, 1)


def folds_arms(args, result: dict, save) -> None:
    """A single network on the N training cases against one K-fold ensemble of the same cases, read as its mean, its
    vote and each member alone (a member trains on (K-1)/K of the cases)."""
    ids = sorted(c.case_id for c in load_dataset(args.dataset).cases)
    test = ids[: args.holdout][: args.test]
    result["test_cases"] = test
    for arm, fields in {"single": {}, f"folds{args.folds}": {"folds": args.folds}}.items():
        if arm in result["arms"]:
            continue
        out = Path(args.work) / arm
        seconds = train(args, args.dataset, out, holdout=args.holdout, cases=args.cases, **fields)
        result["arms"][arm] = {"train_seconds": seconds}
        rescore(args, result["arms"][arm], arm, out, args.dataset, test)
        save(arm)


def sequences_arms(args, result: dict, save) -> None:
    """Leave one case out: per round, a multi-channel network and a per-sequence ensemble, the latter read as its
    mean, its vote and each sequence's member alone (the network an `isl train` of that sequence alone would give)."""
    dataset = resampled(args.dataset, args.resample, Path(args.work)) if args.resample else args.dataset
    ds = load_dataset(dataset)
    only = [f"only_{n}" for n in ds.channel_names]
    ids = sorted(c.case_id for c in ds.cases)
    for arm, fields in {"multi_channel": {}, "per_sequence": {"per_sequence": True}}.items():
        rows = result["arms"].setdefault(arm, {"train_seconds": 0.0, "per_case": {}})
        for case_id in ids:
            if case_id in rows["per_case"]:
                continue
            out = Path(args.work) / f"{arm}_{case_id}"
            rows["train_seconds"] += train(args, leave_out(dataset, case_id, Path(args.work)), out, **fields)
            rescore(args, rows, arm, out, dataset, [case_id], only)
            save(f"{arm} without {case_id}")


def rescore(args, rows: dict, arm: str, out: Path, dataset: str, ids: list[str], names: list[str] | None = None):
    """Score the bundle `out` on `ids` into the arm's `rows` (per_case: mean Dice per variant; per_part: per label or
    region)."""
    scored, parts = score(out, dataset, ids, ["network", "mean", "vote"] if args.isl else [], args.regions, names)
    for case_id in ids:
        rows.setdefault("per_case", {})[case_id] = {_label(arm, v): d for v, d in scored[case_id].items()}
        rows.setdefault("per_part", {})[case_id] = {_label(arm, v): d for v, d in parts[case_id].items()}


def rescore_all(args, result: dict, save) -> None:
    """--rescore: score every trained bundle of the JSON again (no training), e.g. after the scoring changed."""
    for arm, rows in result["arms"].items():
        if args.mode == "folds":
            rescore(args, rows, arm, Path(args.work) / arm, args.dataset, result["test_cases"])
        else:
            dataset = resampled(args.dataset, args.resample, Path(args.work)) if args.resample else args.dataset
            only = [f"only_{n}" for n in load_dataset(dataset).channel_names]
            for case_id in sorted(rows["per_case"]):
                rescore(args, rows, arm, Path(args.work) / f"{arm}_{case_id}", dataset, [case_id], only)
        save(f"{arm} rescored")


def _label(arm: str, variant: str) -> str:
    if variant.startswith("only_"):
        return variant
    return arm + variant.removeprefix("network") if variant.startswith("network") else f"{arm}_{variant}"


def summary(result: dict, reference: str) -> dict:
    """Per variant: mean Dice over the cases, and against `reference` the paired difference and Wilcoxon p."""
    from isl.evaluation.stats import paired_p

    rows: dict[str, dict[str, float]] = {}
    for arm in result["arms"].values():
        for case_id, row in arm["per_case"].items():
            for variant, d in row.items():
                rows.setdefault(variant, {})[case_id] = d
    parts: dict[str, dict[str, list[float]]] = {}
    for arm in result["arms"].values():
        for row in arm.get("per_part", {}).values():
            for variant, d in row.items():
                for name, v in d.items():
                    parts.setdefault(variant, {}).setdefault(name, []).append(v)
    ref = rows.get(reference, {})
    out = {}
    for variant, cases in rows.items():
        out[variant] = {"mean_dice": round(float(np.mean(list(cases.values()))), 5), "cases": len(cases)}
        if variant in parts:
            out[variant]["per_part"] = {n: round(float(np.mean(v)), 5) for n, v in parts[variant].items()}
        common = sorted(set(cases) & set(ref))
        if variant != reference and common:
            a, b = [cases[c] for c in common], [ref[c] for c in common]
            p = paired_p(a, b)
            out[variant] |= {f"vs_{reference}": round(100 * float(np.mean(np.subtract(a, b))), 2),
                             "better_worse": [int(np.sum(np.greater(a, b))), int(np.sum(np.less(a, b)))],
                             "p": None if p is None else round(p, 4)}
    return out


def markdown(result: dict) -> str:
    """The results page's table of a result: per variant, its mean Dice, each label's or region's, and the paired
    difference to the reference network (points, cases better/worse, Wilcoxon p)."""
    summary = result["summary"]
    parts = list(dict.fromkeys(n for v in summary.values() for n in v.get("per_part", {})))
    ref = next(v for v, row in summary.items() if not any(k.startswith("vs_") for k in row))
    lines = ["| variant | mean Dice | " + " | ".join(parts) + f" | vs {ref} (points; better/worse; p) |",
             "|" + "---|" * (len(parts) + 3)]
    for variant, row in summary.items():
        diff = row.get(f"vs_{ref}")
        versus = "" if diff is None else f"{diff:+.2f}; {row['better_worse'][0]}/{row['better_worse'][1]}; " + (
            "n/a" if row["p"] is None else f"{row['p']:.3f}")
        cells = [f"{row['per_part'][n]:.4f}" if n in row.get("per_part", {}) else "" for n in parts]
        lines.append(f"| {variant} | {row['mean_dice']:.4f} | " + " | ".join(cells) + f" | {versus} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["folds", "sequences", "markdown"], help="markdown: print the results page's "
                    "table of --json and stop")
    ap.add_argument("--dataset", help="the dataset (all modes but markdown)")
    ap.add_argument("--holdout", type=int, default=0)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--resample", type=float, default=None)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--reg-iterations", type=int, default=100)
    ap.add_argument("--region", action="append", default=[], metavar="NAME=L1,L2",
                    help="score this union of labels instead of each label (repeatable), e.g. whole=1,2,3,4")
    ap.add_argument("--isl", action="store_true", help="also ISL on top of the networks and ensembles (ISLConfig "
                    "defaults, unchecked), not of single members")
    ap.add_argument("--rescore", action="store_true", help="score the bundles of --json again, training nothing")
    ap.add_argument("--work", default="scratch/ensemble")
    add_options(ap, json=REQUIRED, threads=2)
    args = ap.parse_args()
    if args.mode == "markdown":
        print(markdown(json.loads(Path(args.json).read_text())))
        return
    if not args.dataset:
        ap.error("--dataset is required")
    args.regions = {n: [int(v) for v in ls.split(",")] for n, ls in (r.split("=", 1) for r in args.region)}
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    result |= {"rescore_command": command(), "rescore_provenance": provenance()} if args.rescore else {
        "command": command(), "provenance": provenance(), "mode": args.mode, "iterations": args.iterations,
        "regions": args.regions}
    reference = "single" if args.mode == "folds" else "multi_channel"

    def save(what: str) -> None:
        result["summary"] = summary(result, reference)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{what}: " + json.dumps({v: s["mean_dice"] for v, s in result["summary"].items()}), file=sys.stderr,
              flush=True)

    if args.rescore:
        rescore_all(args, result, save)
    else:
        (folds_arms if args.mode == "folds" else sequences_arms)(args, result, save)
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    main()
