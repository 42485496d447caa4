"""Seconds per segmentation-training iteration with each number of data-loader worker processes, on one device:
the network, preprocessing and patch of a bundle, trained from the same seeded weights on a dataset's first cases
(the batches are the same for every worker count: see segmentation.train.IterationBatches). Prints JSON.

    python -m benchmarks.train_loader --model models/headneck_ct --dataset ../shared/data/headneck_ct \\
        --device cuda --workers 0 8 --iterations 300 --json benchmarks/results/train_loader_h200.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time

import numpy as np
import torch

from benchmarks.common import REQUIRED, add_options, emit, stamped


class _Waited(logging.Handler):
    """The seconds that train_network says it waited for batches."""

    def __init__(self):
        super().__init__()
        self.seconds = None

    def emit(self, record):
        m = re.search(r"(\d+) s of it waiting for batches", record.getMessage())
        if m:
            self.seconds = int(m.group(1))


def main(argv: list[str] | None = None) -> None:
    from imaging.dataset import load_case, load_dataset
    from isl.bundle import ISLBundle
    from segmentation.network import build_network
    from segmentation.train import TrainConfig, train_network

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, model=REQUIRED, dataset=REQUIRED, device="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--cases", type=int, default=12, help="the dataset's first N cases")
    add_options(ap, json=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    seg = ISLBundle.load(args.model, "cpu").segmentation
    pre, names = seg.preprocessing, seg.labels
    ds = load_dataset(args.dataset)
    images, labels, known = [], [], []
    t0 = time.perf_counter()
    for case in ds.cases[:args.cases]:
        volumes, label, _ = load_case(ds, case)
        images.append(pre.images(volumes)[0])
        labels.append(pre.label(label))
        known.append(case.present(names))
    load_s = time.perf_counter() - t0
    waited = _Waited()
    logging.getLogger("segmentation.train").addHandler(waited)
    logging.getLogger("segmentation.train").setLevel(logging.INFO)
    runs = []
    for workers in args.workers:
        torch.manual_seed(0)
        net = build_network(seg.config, len(pre.channels), len(names))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses = train_network(net, images, labels, pre.patch_size, TrainConfig(iterations=args.iterations),
                               device, annotated=np.asarray(known, bool), mirror_axes=pre.mirror_axes,
                               workers=workers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        runs.append({"workers": workers, "seconds": round(seconds, 1),
                     "seconds_per_iteration": round(seconds / args.iterations, 4),
                     "seconds_waiting_for_batches": waited.seconds, "final_loss": round(losses[-1], 5)})
        print(json.dumps(runs[-1]), flush=True)
    base = runs[0]["seconds"]
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cpu_cores": os.cpu_count(), "cases": len(images),
           "patch_size": list(pre.patch_size), "batch_size": TrainConfig().batch_size,
           "seconds_loading_cases": round(load_s, 1), "runs": runs,
           "speedup_over_first": {str(r["workers"]): round(base / r["seconds"], 2) for r in runs}}
    emit(stamped(out, device), args.json)


if __name__ == "__main__":
    main()
