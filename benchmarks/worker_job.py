"""Jobs end to end through the real service on a chosen device: a private redis-server, `isl serve` and one
`isl worker --device DEVICE` (worker.localstack.LocalStack); each scan is uploaded over HTTP, waited for, and its
mask and report downloaded; the mask is scored against the reference. Two models are served: the bundle as `isl
train` configured it, and a copy whose refinement is forced to full ISL (`<name>_isl`), so that every stage of the
pipeline (registration, fine-tuning, fusion) runs on the device even where the configuration returns the network.
Prints JSON (and writes it with --json).

    python -m benchmarks.worker_job --model models/headneck_ct --dataset ../shared/data/headneck_ct \\
        --case openkbp_002 --device cuda --json benchmarks/results/worker_job_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_options, emit, stamped

KEY = {"bench": "bench-secret-key"}


def forced_isl_copy(model: Path, models_dir: Path) -> str:
    """A copy of the bundle under models_dir whose configured method is ISL itself; returns its name."""
    name = f"{model.name}_isl"
    shutil.copytree(model, models_dir / name)
    meta_path = models_dir / name / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["refinement"]["config"]["method"] = "isl"
    meta["name"] = name
    meta_path.write_text(json.dumps(meta, indent=2))
    return name


def run(model: Path, dataset: Path, cases: list[str], device: str, threads: int) -> dict:
    from imaging.dataset import load_case, load_dataset
    from imaging.io import read_image
    from imaging.metrics import dice
    from service.client import Client
    from worker.localstack import LocalStack

    ds = load_dataset(dataset)
    out = {"device": device, "python": platform.python_version(), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models_dir = tmp / "models"
        models_dir.mkdir()
        shutil.copytree(model, models_dir / model.name)
        forced = forced_isl_copy(model, models_dir)
        t0 = time.perf_counter()
        with LocalStack(tmp / "stack", models_dir, model.name, dataset, KEY, workers=1, threads_per_worker=threads,
                        device=device) as stack:
            out["stack_start_seconds"] = round(time.perf_counter() - t0, 2)
            client = Client(stack.url, KEY["bench"], timeout=120)
            for case_id in cases:
                case = ds.case(case_id)
                _, label, _ = load_case(ds, case)
                fg = [v for v, known in zip(ds.labels, case.present(ds.labels)) if v != 0 and known]
                for name in (model.name, forced):
                    t = time.perf_counter()
                    job = client.submit(case.image_paths[0], model=name)
                    done = client.wait(job["id"], poll=0.2, timeout=900)
                    wall = round(time.perf_counter() - t, 2)
                    row = {"case": case_id, "model": name, "state": done["state"], "submit_to_done_seconds": wall}
                    if done["state"] == "succeeded":
                        report = client.report(job["id"])
                        mask = client.download(job["id"], tmp / f"{job['id']}.nii.gz")
                        scores = dice(read_image(mask).array, label.array, fg)
                        row |= {"worker_device": report.get("device"), "method": report["qa"].get("method"),
                                "stage_seconds": report.get("seconds"),
                                "dice": {ds.labels[k]: round(v, 4) for k, v in scores.items()},
                                "mean_dice": round(sum(scores.values()) / max(len(scores), 1), 4)}
                    else:
                        row["error"] = done.get("error")
                    out["cases"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            out["worker_log_tail"] = (tmp / "stack" / "w1.log").read_text()[-1500:]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--dataset", required=True, type=Path, help="holds the cases and the bundle's atlases")
    ap.add_argument("--case", action="append", required=True, dest="cases")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=4, help="CPU threads of the worker")
    add_options(ap, json=None)
    args = ap.parse_args(argv)
    emit(stamped(run(args.model, args.dataset, args.cases, args.device, args.threads), args.device), args.json)


if __name__ == "__main__":
    main()
