"""`isl`: one thin command line over the Python API. Each command lives in worker/commands/ by what it runs on: the
method on this machine (model.py), the service's processes (serving.py), a running service over HTTP (remote.py).
Heavy imports happen inside each command so that `isl --help` answers at once."""
from __future__ import annotations

import argparse
import logging
import sys

from worker.commands import model, remote, serving


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isl", description="Inference-specific learning for 3D segmentation")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    model.add_train(sub)
    model.add_configure(sub)
    model.add_refine(sub)
    model.add_evaluate(sub)
    model.add_demo(sub)
    serving.add_serve(sub)
    serving.add_dicom_listener(sub)
    remote.add_submit(sub)
    remote.add_correct(sub)
    remote.add_agreement(sub)
    remote.add_retrain(sub)
    remote.add_versions(sub)
    remote.add_promote(sub)
    serving.add_revoke_key(sub)
    serving.add_db(sub)
    serving.add_worker(sub)
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
