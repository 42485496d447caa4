"""Learning curves: Dice on a fixed test split against the number of labelled training cases, for a network trained
from scratch and for networks transferred from other bundles (`isl train --init-from`), each with the baseline
and with ISL on top. Prints JSON (and writes it, arm by arm, to --json so that an interrupted run resumes).

    python -m benchmarks.learning_curve --dataset ../shared/data/hippocampus --holdout 48 --test 15 \\
        --sizes 3 5 10 20 --iterations 600 --reg-iterations 300 \\
        --start headneck_ct=models/headneck_ct --start two_stage=scratch/learning_curve/stage1_brats_flair \\
        --json benchmarks/results/learning_curve_hippocampus.json

A two-stage start is a bundle itself transferred (`isl train --init-from`) onto an intermediate dataset;
docs/results/ gives the command that makes `stage1_brats_flair`. Each arm records its start's lineage.

Every arm trains through `isl.training.train.train_bundle`, as `isl train` does, on the first N cases after the
held-out split, with the same iterations whatever N and whatever the start (a fixed budget: what ten cases buy,
not what a longer training would). `--validation 0`: no cases are set aside and refinement is not configured, so
"isl" is ISL with the ISLConfig defaults, unchecked on this data; the product itself returns the network's own mask
for a model of fewer than 10 cases until it is configured (docs/method.md). Scored on each test case's canonical
grid (the preprocessing's), over the labels its reference contours. --plot draws the figure from the JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REQUIRED, add_options, command, provenance
from imaging.dataset import load_case, load_dataset
from imaging.metrics import dice
from isl.refiner import load_refiner
from isl.training.train import BundleTrainConfig, train_bundle
from segmentation.infer import predict


def _mean_dice(probs: np.ndarray, truth: np.ndarray, labels: list[int]) -> float:
    return float(np.mean(list(dice(probs.argmax(0), truth, labels).values())))


def score(model_dir: Path, dataset: str, test_ids: list[str], isl: bool = True) -> dict:
    """Per test case, the network's mean Dice ("baseline") and, with `isl`, ISL's (defaults, unchecked)."""
    refiner = load_refiner(model_dir, dataset, {"device": "cpu"})
    ds, names = load_dataset(dataset), refiner.bundle.segmentation.labels
    rows, t0 = {}, time.perf_counter()
    for case_id in test_ids:
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        labels = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
        x, truth = refiner.pre.images(volumes)[0], refiner.pre.label(label).astype(np.int64)
        if isl:
            res = refiner.refine(x)
            rows[case_id] = {"baseline": round(_mean_dice(res.baseline, truth, labels), 5),
                             "isl": round(_mean_dice(res.probs, truth, labels), 5)}
        else:
            base = predict(refiner.net, x, refiner.pre.patch_size, refiner.device, ())
            rows[case_id] = {"baseline": round(_mean_dice(base, truth, labels), 5)}
    methods = ("baseline", "isl") if isl else ("baseline",)
    return {"per_case": rows, "mean_dice": {m: round(float(np.mean([r[m] for r in rows.values()])), 5)
                                            for m in methods},
            "isl_seconds_per_case": round((time.perf_counter() - t0) / len(test_ids), 1)}


def run_arm(args, start: str, source: str | None, n: int, test_ids: list[str]) -> dict:
    out = Path(args.work) / f"{start}_{n}"
    cfg = BundleTrainConfig(holdout=args.holdout, cases=n, validation=0, init_from=source,
                            freeze_encoder=args.freeze_encoder if source else 0, name=f"{start}_{n}")
    cfg.training.iterations, cfg.registration.iterations = args.iterations, args.reg_iterations
    if source and args.transfer_lr:
        cfg.training.lr = args.transfer_lr
    t0 = time.perf_counter()
    bundle = train_bundle(args.dataset, out, cfg, torch.device("cpu"), progress=lambda m: None)
    seconds = round(time.perf_counter() - t0, 1)
    lineage = [f"{t['name']} ({t['dataset']})" for t in bundle.meta.get("transfer", {}).get("lineage", [])]
    result = {"start": start, "source": source, "lineage": lineage, "cases": n,
              "train_cases": bundle.meta["train_cases"], "train_seconds": seconds,
              **score(out, args.dataset, test_ids, isl=not args.network_only)}
    print(f"{start} n={n}: {result['mean_dice']} (trained in {seconds} s)", file=sys.stderr, flush=True)
    return result


def markdown(result: dict) -> str:
    """The results page's table: per size, each start's network and ISL (defaults), and each transferred start's
    gain over scratch with its paired Wilcoxon p over the test cases."""
    from isl.evaluation.stats import paired_p

    starts = list(dict.fromkeys(a["start"] for a in result["arms"]))
    arms = {(a["start"], a["cases"]): a for a in result["arms"]}
    both = result.get("isl") is not None
    head = (["cases"] + [f"{s}: network / ISL" if both else f"{s}: network" for s in starts]
            + [f"{s} vs scratch (network)" for s in starts[1:]])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in result["sizes"]:
        row = [str(n)]
        for s in starts:
            a = arms.get((s, n))
            row.append(" / ".join(f"{a['mean_dice'][m]:.4f}" for m in ("baseline", "isl") if m in a["mean_dice"])
                       if a else "not run")
        for s in starts[1:]:
            a, b = arms.get((s, n)), arms.get(("scratch", n))
            if a and b:
                ids = sorted(a["per_case"])
                p = paired_p([a["per_case"][i]["baseline"] for i in ids], [b["per_case"][i]["baseline"] for i in ids])
                gain = 100 * (a["mean_dice"]["baseline"] - b["mean_dice"]["baseline"])
                shown = "<0.001" if p is not None and p < 0.001 else f"{p:.3f}" if p is not None else None
                row.append(f"{gain:+.2f} (p {shown})" if shown else f"{gain:+.2f}")
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    starts = list(dict.fromkeys(a["start"] for a in result["arms"]))
    for i, start in enumerate(starts):
        arms = sorted((a for a in result["arms"] if a["start"] == start), key=lambda a: a["cases"])
        xs = [a["cases"] for a in arms]
        for method, style in (("baseline", "-"), ("isl", "--")):
            if any(method not in a["mean_dice"] for a in arms):
                continue
            ax.plot(xs, [a["mean_dice"][method] for a in arms], style, marker="o", color=f"C{i}",
                    label=f"{start}, {'network' if method == 'baseline' else 'ISL (defaults)'}")
    ax.set_xscale("log")
    ax.set_xticks(result["sizes"], [str(s) for s in result["sizes"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel(f"mean Dice, {len(result['test_cases'])} test cases")
    ax.set_title(f"Learning curves: {Path(result['dataset']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", help="the dataset folder (needed unless --markdown)")
    ap.add_argument("--holdout", type=int, help="the first N cases in sorted order: the test pool (needed unless "
                                                "--markdown)")
    ap.add_argument("--test", type=int, default=15, help="score on the first N held-out cases")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 10, 20])
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--reg-iterations", type=int, default=300)
    ap.add_argument("--start", action="append", default=[], help="NAME=BUNDLE: a transferred start (repeatable)")
    ap.add_argument("--no-scratch", action="store_true", help="transferred starts only")
    ap.add_argument("--freeze-encoder", type=int, default=0)
    ap.add_argument("--transfer-lr", type=float, default=None, help="learning rate of the transferred arms")
    ap.add_argument("--work", default="scratch/learning_curve", help="where the arms' bundles are written")
    add_options(ap, json=REQUIRED)
    ap.add_argument("--plot", default=None, help="PNG path; with an existing --json and no arm left, plot only")
    ap.add_argument("--network-only", action="store_true",
                    help="score the networks alone (no ISL: the registration network is then barely needed, "
                         "--reg-iterations can be small)")
    add_options(ap, threads=2)
    ap.add_argument("--markdown", action="store_true", help="print the results page's table of --json and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.json).read_text())))
        return
    if args.dataset is None or args.holdout is None:
        ap.error("--dataset and --holdout are needed to run arms (only --markdown reads the JSON alone)")
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset)
    test_ids = sorted(c.case_id for c in ds.cases)[: args.holdout][: args.test]
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {"arms": []}
    result |= {"command": command(), "provenance": provenance(), "dataset": args.dataset,
               "test_cases": test_ids, "sizes": args.sizes, "iterations": args.iterations,
               "reg_iterations": args.reg_iterations, "freeze_encoder": args.freeze_encoder,
               "transfer_lr": args.transfer_lr,
               "isl": None if args.network_only else "ISLConfig defaults, unchecked (trained with validation 0)"}
    starts = ([] if args.no_scratch else [("scratch", None)]) + [tuple(s.split("=", 1)) for s in args.start]
    done = {(a["start"], a["cases"]) for a in result["arms"]}
    for n in args.sizes:
        for start, source in starts:
            if (start, n) in done:
                continue
            result["arms"].append(run_arm(args, start, source, n, test_ids))
            path.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(json.dumps({k: v for k, v in result.items() if k != "arms"} | {
        "table": [{"start": a["start"], "cases": a["cases"], **a["mean_dice"]} for a in result["arms"]]}, indent=1))


if __name__ == "__main__":
    main()
