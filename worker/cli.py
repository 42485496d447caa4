"""`isl`: one thin command line over the Python API. Heavy imports happen inside each command so that
`isl --help` answers at once."""
from __future__ import annotations

import argparse
import json
import logging
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
REFINE_OPTIONS = {"atlases": "atlases", "device": "device"}
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
    _setup(args)
    from isl.refiner import pick_device
    from isl.training.train import reconfigure

    record = reconfigure(args.model, args.dataset, args.validation, args.minutes * 60,
                         pick_device(args.device or "auto"), from_scores=args.from_scores, resample=args.resample)
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


def cmd_serve(args) -> int:
    from service.server import run

    run(args.host, args.port, workers=args.workers, log_level="info" if args.verbose else "warning")
    return 0


def cmd_dicom_listener(args) -> int:
    from pydantic import ValidationError

    from service.dimse import Listener
    from service.settings import Settings

    try:
        listener = Listener(Settings(), host=args.host)
    except (ValueError, ValidationError) as exc:
        print(f"isl dicom-listener: error: {exc}", file=sys.stderr)
        return 2
    listener.serve_forever()
    return 0


def cmd_db(args) -> int:
    """The database of job history and the audit trail: bring its schema up to date, or say where it is."""
    from service.db import Records
    from service.settings import Settings

    records = Records(Settings().database())
    try:
        if args.action == "upgrade":
            records.upgrade(args.revision)
        print(json.dumps({"database": records.engine.url.render_as_string(hide_password=True),
                          "revision": records.revision()}))
    finally:
        records.close()
    return 0


def cmd_worker(args) -> int:
    import os

    if args.device:
        os.environ["ISL_DEVICE"] = args.device
    from worker.tasks import app, settings

    argv = ["worker", "--pool=prefork", "--concurrency=1", "-Q", args.queues or settings.queue,
            "--loglevel=INFO" if args.verbose else "--loglevel=WARNING"]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)
    return 0


def cmd_submit(args) -> int:
    import os

    from service.client import submit_batch
    from service.records import JobState

    done = (JobState.SUCCEEDED, "skipped")  # skipped: its result was already in --out
    key = args.api_key or os.environ.get("ISL_API_KEY")
    if not key:
        print("isl submit: error: give --api-key or set ISL_API_KEY", file=sys.stderr)
        return 2
    summary = submit_batch(args.paths, args.server, key, args.out, parallel=args.parallel, model=args.model,
                           atlases=args.atlases, priority=args.priority, timeout=args.timeout,
                           progress=not args.no_progress, formats=tuple(args.formats), sequences=args.sequences)
    counts = {}
    for name, r in summary.items():
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        if r["state"] not in done or r["error"]:  # a success may still lack a format asked for
            print(f"{name}: {r['state']}: {r['error']}", file=sys.stderr)
    print(json.dumps({"cases": len(summary), **counts, "out": args.out}))
    return 0 if all(r["state"] in done for r in summary.values()) else 1


def _client_command(args, command: str, call) -> int:
    """One request of the Python client (`call(client)`), its JSON answer printed; exit 2 without a key, 1 when the
    service refuses (its reason on stderr)."""
    import os

    import httpx

    from service.client import Client, ServiceError

    key = args.api_key or os.environ.get("ISL_API_KEY")
    if not key:
        print(f"isl {command}: error: give --api-key or set ISL_API_KEY", file=sys.stderr)
        return 2
    try:
        print(json.dumps(call(Client(args.server, key)), indent=2))
    except (ServiceError, OSError, httpx.HTTPError) as exc:
        print(f"isl {command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_correct(args) -> int:
    return _client_command(args, "correct", lambda c: c.correct(args.job_id, args.mask, args.note))


def cmd_agreement(args) -> int:
    return _client_command(args, "agreement", lambda c: c.agreement(args.model, args.png, args.group_by))


def cmd_retrain(args) -> int:
    options = {k: v for k, v in (("iterations", args.iterations), ("reg_iterations", args.reg_iterations),
                                 ("configure", args.configure), ("margin", args.margin)) if v is not None}

    def call(c):
        queued = c.retrain(args.model, **options)
        return c.wait_training(args.model, queued["id"], timeout=args.timeout) if args.wait else queued

    return _client_command(args, "retrain", call)


def cmd_versions(args) -> int:
    return _client_command(args, "versions", lambda c: c.versions(args.model))


def cmd_promote(args) -> int:
    return _client_command(args, "promote", lambda c: c.promote(args.model, args.version, args.force, args.reason))


def cmd_revoke_key(args) -> int:
    """Revokes a tenant key at once on every API process sharing this Redis and database, for good (the key itself
    is read from stdin so that it stays out of shell history, or given as its sha256)."""
    from service.jobs import open_store
    from service.settings import Settings, hash_key

    digest = args.sha256 or hash_key(sys.stdin.readline().strip())
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        print("isl revoke-key: error: --sha256 takes the 64 hex digits of the key's sha256", file=sys.stderr)
        return 2
    open_store(Settings()).revoke(digest)  # the database first (it outlives Redis), then Redis
    print(json.dumps({"revoked": digest}))
    return 0


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="service base URL, e.g. http://isl.hospital:8000")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ISL_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isl", description="Inference-specific learning for 3D segmentation")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("refine", help="refine the segmentation of one scan")
    p.add_argument("input", nargs="+", help="NIfTI file, DICOM folder or .zip of a DICOM series (one per channel, "
                                            "in the model's order)")
    p.add_argument("--model", required=True, help="model bundle folder")
    p.add_argument("--out", required=True, help="output folder (mask + report.json)")
    p.add_argument("--atlas-dir", default=None, help="dataset folder holding the bundle's atlas cases")
    p.add_argument("--atlases", type=int, default=None, help="K atlases per scan (default: the config's)")
    p.add_argument("--series-uid", default=None, help="which DICOM series, when the input holds several")
    p.add_argument("--sequence-series", action="append", default=[], metavar="SEQUENCE=UID",
                   help="for a model of several sequences given one DICOM study (folder or zip): the series of this "
                        "sequence (default: the series whose description names it); repeatable")
    _device_arg(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("evaluate", help="baseline vs ISL vs peers on labelled cases the model never saw")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--atlas-dir", default=None, help="dataset folder holding the atlases (default: --dataset)")
    p.add_argument("--cases", type=int, default=None, help="the first N eligible cases in sorted order")
    p.add_argument("--atlases", type=int, default=None)
    p.add_argument("--figure", default=None, help="PNG figure path (default: beside the JSON)")
    _device_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="synthetic phantoms: train a small model, refine a held-out case")
    p.add_argument("--out", default="isl-demo", help="output folder")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget")
    _device_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the HTTP API (settings from ISL_* environment variables: docs/settings.md)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dicom-listener", help="run the DICOM C-STORE SCP: each series a PACS or router sends becomes a "
                                              "job (settings from ISL_* environment variables: docs/settings.md)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (the port is ISL_DIMSE_PORT)")
    p.set_defaults(func=cmd_dicom_listener)

    p = sub.add_parser("submit", help="batch client: upload scans to a server, wait, download results (resumable)")
    p.add_argument("paths", nargs="+", help="NIfTI files, .zip DICOM series or DICOM folders, one case each")
    p.add_argument("--server", required=True, help="service base URL, e.g. http://isl.hospital:8000")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ISL_API_KEY)")
    p.add_argument("--out", required=True, help="results folder: OUT/<case>/mask.nii.gz and report.json")
    p.add_argument("--parallel", type=int, default=4, help="uploads and waits in flight at once")
    p.add_argument("--model", default=None)
    p.add_argument("--atlases", type=int, default=None)
    p.add_argument("--priority", type=int, default=5)
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each case")
    p.add_argument("--format", action="append", choices=["dicom-seg", "rtstruct"], default=[], dest="formats",
                   help="also download this result format beside mask.nii.gz, for DICOM inputs (repeatable): "
                        "OUT/<case>/seg.dcm, rtstruct.dcm")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sequences", action="store_true",
                   help="for a model of several sequences: files named CASE_0000.nii.gz, CASE_0001.nii.gz... (or .zip) "
                        "are one case, one file per sequence in the model's order")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("correct", help="send a radiologist's correction of a job's mask to the server")
    p.add_argument("job_id", help="the job whose mask it corrects")
    p.add_argument("mask", help="the corrected label map: NIfTI on the job's grid, or a DICOM SEG of its series")
    p.add_argument("--server", required=True, help="service base URL, e.g. http://isl.hospital:8000")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ISL_API_KEY)")
    p.add_argument("--note", default="", help="free text kept with the correction")
    p.set_defaults(func=cmd_correct)

    p = sub.add_parser("agreement", help="the agreement of a model's masks with your radiologists' corrections "
                                         "(JSON; --png: the Bland-Altman plot)")
    p.add_argument("--model", required=True, help="model bundle name")
    p.add_argument("--server", required=True, help="service base URL, e.g. http://isl.hospital:8000")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ISL_API_KEY)")
    p.add_argument("--png", default=None, help="save the Bland-Altman plot of the latest version's batch here")
    p.add_argument("--group-by", default=None, help="split each batch by this key of the cases' metadata")
    p.set_defaults(func=cmd_agreement)

    p = sub.add_parser("retrain", help="queue a retraining of a model on its base data plus your radiologists' "
                                       "corrections; the new version goes live if the promotion rule passes")
    p.add_argument("--model", required=True, help="model bundle name")
    _server_args(p)
    p.add_argument("--iterations", type=int, default=None, help="segmentation iterations (default: the parent's)")
    p.add_argument("--reg-iterations", type=int, default=None, help="registration iterations (default: the parent's)")
    p.add_argument("--no-configure", dest="configure", action="store_const", const=False, default=None,
                   help="keep the parent's refinement settings instead of searching them again")
    p.add_argument("--margin", type=float, default=None, help="promotion: how much lower mean Dice than the parent "
                                                              "still counts as no worse (default 0)")
    p.add_argument("--wait", action="store_true", help="wait until it has ended and print the outcome")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("versions", help="a model's versions for your tenant: lineage, figures, which one is live")
    p.add_argument("--model", required=True, help="model bundle name")
    _server_args(p)
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("promote", help="make a version of a model live for your tenant (or the base bundle's)")
    p.add_argument("version", help="the version (isl versions lists them)")
    p.add_argument("--model", required=True, help="model bundle name")
    _server_args(p)
    p.add_argument("--force", action="store_true", help="promote a version the rule rejected or did not judge")
    p.add_argument("--reason", default="", help="why (required with --force; kept in the audit trail)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("revoke-key", help="revoke an API key now, on every API process (the key on stdin, or --sha256)")
    p.add_argument("--sha256", default=None, help="the key's sha256 (as in ISL_API_KEYS) instead of the key on stdin")
    p.set_defaults(func=cmd_revoke_key)

    p = sub.add_parser("db", help="the database of job history and the audit trail (ISL_DATABASE_URL): migrate its "
                                  "schema, or show its revision; the API, workers and listener also migrate at start")
    p.add_argument("action", choices=["upgrade", "current"])
    p.add_argument("--revision", default="head", help="upgrade to this revision (default head)")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("worker", help="run one refinement worker (one per GPU) consuming the job queue")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides ISL_DEVICE")
    p.add_argument("--name", default=None, help="Celery node name (default: celery@host)")
    p.add_argument("--queues", default=None, help="queues to consume, comma-separated (default: ISL_QUEUE, the "
                                                  "refinement jobs; add ISL_TRAIN_QUEUE, 'train', for retrainings)")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from imaging.errors import ISLError

    try:
        return args.func(args)
    except ISLError as exc:
        print(f"isl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
