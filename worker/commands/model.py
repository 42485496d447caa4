"""`isl train`, `configure`, `refine`, `evaluate` and `demo`: the commands that run the method on this machine, and the
one path from their options to the method's configs."""
from __future__ import annotations

import argparse
import json
import sys


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to compute (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")

def _setup(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


# The one path from options to configs: option (argparse dest) -> config field(s), dotted for nested fields.
# An option left out (None) keeps the config's default; the config validates what is given.
REFINE_OPTIONS = {"atlases": "atlases", "device": "device", "global_alignment": "affine.kind"}
TRAIN_OPTIONS = {"holdout": "holdout", "cases": "cases", "validation": "validation", "atlas_pool": "atlas_pool",
                 "name": "name", "configure": "configure", "configure_minutes": "configure_minutes",
                 "iterations": "training.iterations", "reg_iterations": "registration.iterations", "lr": "training.lr",
                 "init_from": "init_from", "freeze_encoder": "freeze_encoder", "folds": "folds",
                 "per_sequence": "per_sequence", "combine": "combine",
                 "seed": ("training.seed", "registration.seed")}


def config_from(args, model, options: dict, **fixed):
    """`model` (a pydantic config class) from the options named in `options`, or InputError naming the option."""
    from pydantic import ValidationError

    from imaging.errors import InputError

    data, origin = dict(fixed), {}
    for option, fields in options.items():
        value = getattr(args, option, None)
        for name in (fields,) if isinstance(fields, str) else fields:
            origin[name] = "--" + option.replace("_", "-")
            if value is not None:
                *parents, leaf = name.split(".")
                node = data
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            name = ".".join(str(x) for x in e["loc"])
            problems.append(f"{origin.get(name, name)} {e.get('input')!r}: {e['msg']}")
        raise InputError("; ".join(problems)) from None

def cmd_train(args) -> int:
    import shlex

    _setup(args)
    from isl.refiner import pick_device
    from isl.training.train import BundleTrainConfig, train_bundle

    cfg = config_from(args, BundleTrainConfig, TRAIN_OPTIONS, command=shlex.join(["isl", *sys.argv[1:]]))
    train_bundle(args.dataset, args.out, cfg, pick_device(args.device or "auto"), resume=args.resume)
    return 0

def cmd_configure(args) -> int:
    import shlex

    _setup(args)
    from isl.refiner import pick_device
    from isl.training.train import reconfigure

    record = reconfigure(args.model, args.dataset, args.validation, args.minutes * 60,
                         pick_device(args.device or "auto"), from_scores=args.from_scores, resample=args.resample,
                         command=shlex.join(["isl", *sys.argv[1:]]))
    print(json.dumps({"decision": record["decision"], "config": record["config"], "table": record["table"]}, indent=2))
    return 0

def sequence_series(pairs: list[str]) -> dict[str, str]:
    """`--sequence-series NAME=UID` options as a mapping, or InputError naming the one that is not NAME=UID."""
    from imaging.errors import InputError

    out = {}
    for pair in pairs:
        name, sep, uid = pair.partition("=")
        if not sep or not name or not uid:
            raise InputError(f"--sequence-series {pair!r}: give SEQUENCE=SERIES_UID, e.g. FLAIR=1.2.840.113619.2.5")
        out[name] = uid
    return out

def cmd_refine(args) -> int:
    _setup(args)
    from isl.config import ISLConfig
    from worker.pipeline import refine_file

    cfg = config_from(args, ISLConfig, REFINE_OPTIONS).model_dump(exclude_unset=True)  # on the bundle's own
    report = refine_file(args.input, args.model, args.out, atlas_dir=args.atlas_dir, cfg=cfg,
                         series_uid=args.series_uid, sequence_series=sequence_series(args.sequence_series))
    print(json.dumps({k: report[k] for k in ("output", "volumes_ml", "seconds", "model_version")}, indent=2))
    return 0

def cmd_evaluate(args) -> int:
    import shlex

    _setup(args)
    from isl.config import ISLConfig
    from isl.evaluation.evaluate import evaluate

    cfg = config_from(args, ISLConfig, REFINE_OPTIONS).model_dump(exclude_unset=True)
    result = evaluate(args.dataset, args.model, args.json, atlas_dir=args.atlas_dir, cases=args.cases, cfg=cfg,
                      figure=args.figure, command=shlex.join(["isl", *sys.argv[1:]]))
    print(json.dumps(result["summary"], indent=2))
    return 0

def cmd_demo(args) -> int:
    _setup(args)
    from worker.demo import run_demo

    return run_demo(args.out, minutes=args.minutes, device=args.device or "auto")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model bundle (segmentation + registration) on a labelled dataset")
    p.add_argument("--dataset", required=True, help="MSD / nnU-Net raw dataset folder")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--cases", type=int, default=None, help="train on the first N cases after the holdout")
    p.add_argument("--holdout", type=int, default=None,
                   help="never train on the first N cases in sorted order (default 0)")
    p.add_argument("--validation", type=int, default=None,
                   help="training cases set aside to configure refinement on (default: a fifth, 3 to 10; none under "
                        "10 cases, and then refinement returns the network's own mask until the model is configured)")
    p.add_argument("--atlas-pool", type=int, default=None, help="training cases kept as atlases (default 40)")
    p.add_argument("--iterations", type=int, default=None, help="segmentation training iterations (default 2500)")
    p.add_argument("--reg-iterations", type=int, default=None, help="registration training iterations (default 1000)")
    p.add_argument("--seed", type=int, default=None, help="seed of both trainings (default 0)")
    p.add_argument("--lr", type=float, default=None, help="segmentation learning rate (default 0.002; a transfer "
                                                          "may want a smaller one)")
    p.add_argument("--init-from", default=None, metavar="BUNDLE",
                   help="transfer learning: start both networks from this bundle's, whatever its organ, modality or "
                        "labels (the layers that fit are copied, the output layer is new); chain runs for a "
                        "two-stage transfer. The card records the lineage")
    p.add_argument("--freeze-encoder", type=int, default=None, metavar="STEPS",
                   help="with --init-from: hold the transferred encoder still for the first STEPS iterations")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="an ensemble of K networks, each trained without one fold of the training cases, served as "
                        "one model (ISL refines the ensemble's mask)")
    p.add_argument("--per-sequence", action="store_const", const=True, default=None,
                   help="an ensemble of one network per sequence, each on its own sequence, served as one model")
    p.add_argument("--combine", choices=["mean", "vote"], default=None,
                   help="how an ensemble combines its members: probability averaging (default) or majority vote")
    p.add_argument("--name", default=None, help="bundle name (default: the folder name)")
    p.add_argument("--resume", action="store_true", help="reuse a segmentation network left by an interrupted run")
    p.add_argument("--no-configure", dest="configure", action="store_const", const=False, default=None,
                   help="skip the search of refinement settings on the validation cases (ISL runs with the "
                        "ISLConfig defaults, unchecked on this data)")
    p.add_argument("--configure-minutes", type=float, default=None,
                   help="time budget of that search (default 30; whole validation cases, at least 2)")
    _device_arg(p)
    p.set_defaults(func=cmd_train)


def add_configure(sub) -> None:
    p = sub.add_parser("configure", help="search the refinement settings of an existing bundle on validation cases")
    p.add_argument("--model", required=True, help="bundle folder (rewritten with the chosen settings)")
    p.add_argument("--dataset", required=True, help="the dataset folder (validation cases and atlases)")
    p.add_argument("--validation", type=int, default=10,
                   help="for a bundle trained without validation cases (or with --resample): how many unused cases to "
                        "sample (default 10)")
    p.add_argument("--resample", action="store_true",
                   help="configure on a new sample of --validation cases that the bundle neither trained on, uses as "
                        "atlases nor holds out, in place of the validation cases it has")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget (default 30)")
    p.add_argument("--from-scores", action="store_true",
                   help="no search: re-make the decision by the current rule from the scores the last search left "
                        "in the bundle (configuration_scores.json)")
    _device_arg(p)
    p.set_defaults(func=cmd_configure)


def add_refine(sub) -> None:
    p = sub.add_parser("refine", help="refine the segmentation of one scan")
    p.add_argument("input", nargs="+", help="NIfTI file, DICOM folder or .zip of a DICOM series (one per channel, "
                                            "in the model's order)")
    p.add_argument("--model", required=True, help="model bundle folder")
    p.add_argument("--out", required=True, help="output folder (mask + report.json)")
    p.add_argument("--atlas-dir", default=None, help="dataset folder holding the bundle's atlas cases")
    p.add_argument("--atlases", type=int, default=None, help="K atlases per scan (default: the config's)")
    _global_alignment_arg(p)
    p.add_argument("--series-uid", default=None, help="which DICOM series, when the input holds several")
    p.add_argument("--sequence-series", action="append", default=[], metavar="SEQUENCE=UID",
                   help="for a model of several sequences given one DICOM study (folder or zip): the series of this "
                        "sequence (default: the series whose description names it); repeatable")
    _device_arg(p)
    p.set_defaults(func=cmd_refine)


def _global_alignment_arg(p) -> None:
    p.add_argument("--global-alignment", choices=["none", "rigid", "similarity", "affine"], default=None,
                   help="a global transform per atlas before the deformable registration (default: the bundle's "
                        "configuration)")


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="baseline vs ISL vs peers on labelled cases the model never saw")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--atlas-dir", default=None, help="dataset folder holding the atlases (default: --dataset)")
    p.add_argument("--cases", type=int, default=None, help="the first N eligible cases in sorted order")
    p.add_argument("--atlases", type=int, default=None)
    _global_alignment_arg(p)
    p.add_argument("--figure", default=None, help="PNG figure path (default: beside the JSON)")
    _device_arg(p)
    p.set_defaults(func=cmd_evaluate)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic phantoms: train a small model, refine a held-out case")
    p.add_argument("--out", default="isl-demo", help="output folder")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget")
    _device_arg(p)
    p.set_defaults(func=cmd_demo)
