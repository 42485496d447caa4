"""`isl submit`, `correct`, `agreement`, `retrain`, `versions` and `promote`: clients of a running service over HTTP
(service/client.py), with the tenant's key from --api-key or $ISL_API_KEY."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_submit(args) -> int:
    import os

    from jobstore.records import JobState
    from service.client import submit_batch

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

def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="service base URL, e.g. http://isl.hospital:8000")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ISL_API_KEY)")


def add_submit(sub) -> None:
    p = sub.add_parser("submit", help="batch client: upload scans to a server, wait, download results (resumable)")
    p.add_argument("paths", nargs="+", help="NIfTI files, .zip DICOM series or DICOM folders, one case each")
    _server_args(p)
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


def add_correct(sub) -> None:
    p = sub.add_parser("correct", help="send a radiologist's correction of a job's mask to the server")
    p.add_argument("job_id", help="the job whose mask it corrects")
    p.add_argument("mask", help="the corrected label map: NIfTI on the job's grid, or a DICOM SEG of its series")
    _server_args(p)
    p.add_argument("--note", default="", help="free text kept with the correction")
    p.set_defaults(func=cmd_correct)


def add_agreement(sub) -> None:
    p = sub.add_parser("agreement", help="the agreement of a model's masks with your radiologists' corrections "
                                         "(JSON; --png: the Bland-Altman plot)")
    p.add_argument("--model", required=True, help="model bundle name")
    _server_args(p)
    p.add_argument("--png", default=None, help="save the Bland-Altman plot of the latest version's batch here")
    p.add_argument("--group-by", default=None, help="split each batch by this key of the cases' metadata")
    p.set_defaults(func=cmd_agreement)


def add_retrain(sub) -> None:
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


def add_versions(sub) -> None:
    p = sub.add_parser("versions", help="a model's versions for your tenant: lineage, figures, which one is live")
    p.add_argument("--model", required=True, help="model bundle name")
    _server_args(p)
    p.set_defaults(func=cmd_versions)


def add_promote(sub) -> None:
    p = sub.add_parser("promote", help="make a version of a model live for your tenant (or the base bundle's)")
    p.add_argument("version", help="the version (isl versions lists them)")
    p.add_argument("--model", required=True, help="model bundle name")
    _server_args(p)
    p.add_argument("--force", action="store_true", help="promote a version the rule rejected or did not judge")
    p.add_argument("--reason", default="", help="why (required with --force; kept in the audit trail)")
    p.set_defaults(func=cmd_promote)
